"""Read-only views of a database for the command line: status, sessions, dead letters.

Everything here reads through the store's read views (``StoreViews``),
which never block a running system's writer nor wait for it: reads work
while a system runs. Each view reads in one snapshot (a consistent state)
and returns plain frozen records, which the command line prints as tables
or as JSON. The reading is the store's; the judging and the wording are
here.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs

from ._health import Health, Heartbeat, judge, seconds_text
from ._lock import is_held, lock_file
from ._records import DeadLetter
from .store import Claimed, Membership, SessionCounts, StoreError, StoreViews, database_path
from .store.backends import open_views
from .store.starts import starts_file


def _age(now: float, value: float) -> float:
    return max(now - value, 0.0)


class AdminError(Exception):
    """The database cannot be used: missing, not an actors database, or too new."""


def open_readonly(path: str, busy_timeout: float = 5.0) -> StoreViews:
    """Open an existing actors database read-only (close it after use): an
    SQLite file, or a PostgreSQL database by its URL.

    Raises:
      AdminError: no such file, not an SQLite database, no such server or
        database, no actors schema, or a schema newer than this version of
        actors.
    """
    try:
        return open_views(path, busy_timeout)
    except StoreError as exc:
        raise AdminError(str(exc)) from exc


def lock_path(path: str) -> str:
    """The sidecar lock file a running system holds (see DatabaseLock): by the
    database's resolved path, so every name of the file gives the same one."""
    return lock_file(database_path(path))


def is_running(path: str) -> bool:
    """Whether a system holds the database's lock right now, by any name.

    The file's own lock, as ``run_system`` takes it (``_lock.is_held``): a
    system in this process, or in another one through any name of the file,
    a hard link included. For a file with hard links it opens and closes a
    descriptor of the file, which drops this process's SQLite locks on it:
    ask with no connection to such a database open.
    """
    return is_held(database_path(path))


def read_heartbeat(views: StoreViews) -> Heartbeat | None:
    """The last heartbeat a running system wrote, if any."""
    text = views.heartbeat()
    return None if text is None else Heartbeat.from_json(text)


STALE_FLOOR = 10.0  # seconds: a heartbeat younger than this is never stale


def default_stale_after(heartbeat: Heartbeat) -> float:
    """The default age at which a heartbeat means the system is stuck:
    the larger of 10 s and 5 heartbeat intervals."""
    return max(STALE_FLOOR, 5 * heartbeat.interval)


def oldest_due(views: StoreViews, now: float) -> float | None:
    """Age of the oldest message that is due (pending, not waiting for a delay
    or a retry) or in flight; None if there is none. As Store.oldest_due."""
    oldest = views.oldest_due(now)
    return None if oldest is None else _age(now, oldest)


@attrs.frozen(kw_only=True)
class SessionRow:
    """One session's messages by state (``actors sessions``, ``actors status``).

    ``in_flight``: messages whose handler has started (see ``StoreViews.claimed``);
    ``handed``: claimed by the session's actor, waiting in its memory, not
    started. ``oldest_age``: seconds since its oldest pending, handed or
    in-flight message was sent (None if it has none); ``most_attempts``:
    the most attempts any of its messages has used.
    """

    session_id: str
    pending: int
    handed: int
    in_flight: int
    dead: int
    oldest_age: float | None
    most_attempts: int


@attrs.frozen(kw_only=True)
class InFlightRow:
    """A message a handler runs now; ``age``: seconds since it was sent."""

    id: int
    session_id: str
    attempt: int
    age: float


@attrs.frozen(kw_only=True)
class MemberRow:
    """A process of a cluster (``actors status`` and ``actors health`` on PostgreSQL).

    ``state``: ``running``; ``stopping`` (its heartbeat says a stop began);
    ``stuck`` (alive by its lease, which another connection renews, but its
    heartbeat is older than the stale limit: its writes do not go through);
    ``starting`` (no heartbeat yet); ``gone`` (it left, or its lease ran
    out). ``buckets``: how many it holds now. ``up``: seconds since it
    joined (None once gone); ``heartbeat_age``: since its last heartbeat (None without one);
    ``processed``: what it processed since it started, by that heartbeat.
    """

    id: str
    host: str
    pid: int
    alive: bool
    state: str
    buckets: int
    up: float | None
    heartbeat_age: float | None
    processed: int | None


@attrs.frozen(kw_only=True)
class ClusterStatus:
    """The processes sharing a PostgreSQL database, and their buckets.

    ``buckets``: how many the sessions are hashed into; ``held``: how many of
    them live members hold; ``live``: how many members are alive, of
    ``member_count`` the database remembers (a gone one for some minutes);
    ``members``: the live ones first, then by when they joined (at most the
    limit asked for).
    """

    buckets: int
    held: int
    live: int
    member_count: int
    members: list[MemberRow]


def _member_state(
    alive: bool, beat: Heartbeat | None, age: float, stale_after: float | None
) -> str:
    if not alive:
        return "gone"
    if beat is None:
        return "starting"
    if beat.stopping:
        return "stopping"
    limit = stale_after if stale_after is not None else default_stale_after(beat)
    return "stuck" if age > limit else "running"


def cluster_status(
    membership: Membership, now: float, limit: int, stale_after: float | None = None
) -> ClusterStatus:
    """The members as the command line shows them (``stale_after``: as ``actors
    health``'s; by default each member's own, from its heartbeat)."""
    rows = []
    for m in membership.members[:limit]:
        beat = None if m.heartbeat is None else Heartbeat.from_json(m.heartbeat)
        age = None if beat is None else _age(now, beat.at)
        rows.append(
            MemberRow(
                id=m.id,
                host=m.host,
                pid=m.pid,
                alive=m.alive,
                state=_member_state(m.alive, beat, age or 0.0, stale_after),
                buckets=m.buckets,
                up=_age(now, m.started_at) if m.alive else None,
                heartbeat_age=age,
                processed=None if beat is None else beat.processed,
            )
        )
    live = [m for m in membership.members if m.alive]
    return ClusterStatus(
        buckets=membership.buckets,
        held=sum(m.buckets for m in live),
        live=len(live),
        member_count=len(membership.members),
        members=rows,
    )


@attrs.frozen(kw_only=True)
class Status:
    """The state of a database (``actors status``).

    ``running``: a system holds the database's lock (see :func:`is_running`).
    ``pending`` counts every message waiting in the database; of them
    ``delayed`` wait for their delay, ``retry_waiting`` for a retry
    deadline, and the rest are due. ``handed`` and ``in_flight`` are as in
    ``StoreViews.claimed`` (``statistics().pending`` of the running system counts
    the handed ones as pending). ``oldest_pending_age`` is as in Health. ``attempts`` maps an
    attempt count to how many pending or in-flight messages have used that
    many (a message with 2 or more has been retried). ``sessions`` are the
    deepest queues, at most the limit asked for, of ``session_count``.
    ``heartbeat`` is the last one a system wrote (old, or from a system
    that stopped, when ``running`` is false; of a cluster, the newest of
    its live members'). ``cluster``: the members of a PostgreSQL database
    (None for SQLite), whose leases say whether it is ``running``.
    """

    path: str
    checked_at: float
    running: bool
    schema_version: int
    pending: int
    delayed: int
    retry_waiting: int
    handed: int
    in_flight: int
    dead: int
    oldest_pending_age: float | None
    attempts: dict[int, int]
    session_count: int
    sessions: list[SessionRow]
    in_flight_messages: list[InFlightRow]
    open_requests: int
    heartbeat: Heartbeat | None
    cluster: ClusterStatus | None = None


def starts_path(path: str) -> str:
    """The start table a system keeps beside the database (see ``store/starts.py``),
    by its resolved path, as the store names it."""
    return starts_file(database_path(path))


def _session_row(row: SessionCounts, now: float, found: Claimed) -> SessionRow:
    handed = found.handed.get(row.session_id, 0)
    return SessionRow(
        session_id=row.session_id,
        pending=row.pending,
        handed=handed,
        in_flight=row.claimed - handed,
        dead=row.dead,
        oldest_age=None if row.oldest_enqueued_at is None else _age(now, row.oldest_enqueued_at),
        most_attempts=row.most_attempts,
    )


def status(views: StoreViews, now: float, *, limit: int = 20, running: bool = False) -> Status:
    """Read the database's state in one snapshot (the deepest ``limit`` sessions).

    ``running``: whether a system runs on it (:func:`is_running`), as the
    caller found; for a cluster, its members' leases say (read here).
    ``handed`` and ``in_flight`` are told apart by ``StoreViews.claimed``.
    """
    with views.snapshot():
        version = views.schema_version()
        membership = views.membership()
        cluster = None if membership is None else cluster_status(membership, now, limit)
        if cluster is not None:
            running = cluster.live > 0
        counts = views.counts(now)
        session_count = views.session_count()
        found = views.claimed()  # (after a first read: see StoreViews.claimed)
        return Status(
            path=views.path,
            checked_at=now,
            running=running,
            schema_version=version,
            pending=counts.pending,
            delayed=counts.delayed,
            retry_waiting=counts.retry_waiting,
            handed=found.count,
            in_flight=counts.claimed - found.count,
            dead=counts.dead,
            oldest_pending_age=oldest_due(views, now),
            attempts=views.attempts_used(found.handed_ids),
            session_count=session_count,
            sessions=[
                _session_row(row, now, found) for row in views.sessions(limit, found.handed_ids)
            ],
            in_flight_messages=[
                InFlightRow(
                    id=m.id,
                    session_id=m.session_id,
                    attempt=m.attempt,
                    age=_age(now, m.enqueued_at),
                )
                for m in views.in_flight(found.handed_ids, limit)
            ],
            open_requests=views.open_requests(),
            heartbeat=read_heartbeat(views),
            cluster=cluster,
        )


def sessions(
    views: StoreViews, now: float, *, limit: int = 100, session_id: str | None = None
) -> tuple[list[SessionRow], int]:
    """Sessions with messages, deepest queue first (only ``session_id`` if given),
    and how many sessions have messages (of which at most ``limit`` are listed)."""
    with views.snapshot():
        count = views.session_count(session_id)
        found = views.claimed()
        rows = views.sessions(limit, found.handed_ids, session_id)
        return [_session_row(row, now, found) for row in rows], count


def dead_letters(
    views: StoreViews, session_id: str | None = None, limit: int | None = None
) -> tuple[list[DeadLetter], int]:
    """Dead letters, oldest first (the same reader as ``System.dead_letters()``),
    and how many there are (of which at most ``limit`` are listed)."""
    with views.snapshot():
        count = views.dead_count(session_id)
        return views.dead_letters(session_id, limit), count


def to_plain(value: Any) -> Any:
    """A record (or list of them) as JSON-ready data; bytes bodies as ``{"base64": ...}``."""
    if attrs.has(type(value)):
        return {k: to_plain(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    return value


@attrs.frozen(kw_only=True)
class HealthReport:
    """The verdict of ``actors health`` and what it rests on.

    ``running``: a system holds the database's lock (of a cluster: a member
    is alive). ``heartbeat_age``: seconds since its last heartbeat (None
    without one; of a cluster, the newest). ``health``: the judgement from
    that heartbeat and the database (None when there is no fresh heartbeat
    to judge by). ``cluster``: the members of a PostgreSQL database (None
    for SQLite).
    """

    path: str
    running: bool
    healthy: bool
    reason: str
    heartbeat_age: float | None
    stale_after: float | None
    health: Health | None
    cluster: ClusterStatus | None = None


def check_health(
    views: StoreViews,
    now: float,
    *,
    running: bool,
    stall_after: float,
    stale_after: float | None = None,
) -> HealthReport:
    """Judge a database's system: not running, stuck (stale heartbeat), stalled, or healthy.

    The rule is ``judge``'s, as in ``System.health()``: the oldest due
    message is read from the database now, the last progress from the
    heartbeat; a system whose heartbeat says it is stopping is unhealthy.
    """
    with views.snapshot():
        membership = views.membership()
        if membership is not None:
            return _cluster_health(views, now, membership, stall_after, stale_after)
        heartbeat = read_heartbeat(views)
        age = None if heartbeat is None else max(now - heartbeat.at, 0.0)
        stale = None
        if heartbeat is not None:
            stale = stale_after if stale_after is not None else default_stale_after(heartbeat)

        def verdict(healthy: bool, reason: str, health: Health | None = None) -> HealthReport:
            return HealthReport(
                path=views.path,
                running=running,
                healthy=healthy,
                reason=reason,
                heartbeat_age=age,
                stale_after=stale,
                health=health,
            )

        if not running:
            last = "" if age is None else f" (last heartbeat {seconds_text(age)} ago)"
            return verdict(False, f"no system is running on {views.path}{last}")
        if heartbeat is None or age is None or stale is None:
            return verdict(False, "the running system has written no heartbeat yet")
        if heartbeat.stopping:
            # As System.health(): a system running out a stop's grace is not healthy.
            return verdict(False, "the system is shutting down")
        if age > stale:
            return verdict(
                False,
                f"stuck: the last heartbeat is {seconds_text(age)} old (more than"
                f" {seconds_text(stale)}): the system's loop or its database writer is not"
                " running",
            )
        health = _judge(views, now, stall_after, [heartbeat])
        return verdict(health.healthy, health.reason, health)


def _cluster_health(
    views: StoreViews,
    now: float,
    membership: Membership,
    stall_after: float,
    stale_after: float | None,
) -> HealthReport:
    """``check_health`` of a cluster: judged by its live members (inside the snapshot).

    Not running when no member is alive. Unhealthy when no live member has
    written a heartbeat yet, when one is stuck (alive by its lease, but its
    heartbeat is stale: its sessions make no progress), or when every live
    one is stopping. Then the rule of ``judge``, the last progress the most
    recent of the members that are not stopping, their counts summed.
    """
    cluster = cluster_status(membership, now, len(membership.members), stale_after)
    beats = [
        beat
        for m in membership.members
        if m.alive and (beat := Heartbeat.from_json(m.heartbeat)) is not None
    ]
    newest = read_heartbeat(views)  # (the newest live member's, else the last one's)
    age = None if newest is None else _age(now, newest.at)
    stale = stale_after
    if stale is None and beats:
        stale = max(default_stale_after(beat) for beat in beats)

    def verdict(healthy: bool, reason: str, health: Health | None = None) -> HealthReport:
        return HealthReport(
            path=views.path,
            running=cluster.live > 0,
            healthy=healthy,
            reason=reason,
            heartbeat_age=age,
            stale_after=stale,
            health=health,
            cluster=cluster,
        )

    if not cluster.live:
        last = "" if age is None else f" (last heartbeat {seconds_text(age)} ago)"
        return verdict(False, f"no system is running on {views.path}: no member is alive{last}")
    if not beats:
        return verdict(False, "no running member has written a heartbeat yet")
    for m in cluster.members:
        if m.state == "stuck" and m.heartbeat_age is not None:
            return verdict(
                False,
                f"stuck: the last heartbeat of member pid {m.pid} on {m.host} is"
                f" {seconds_text(m.heartbeat_age)} old: its writes to the database do not"
                " go through",
            )
    working = [beat for beat in beats if not beat.stopping]
    if not working:
        return verdict(False, "the system is shutting down")
    health = _judge(views, now, stall_after, working)
    return verdict(health.healthy, health.reason, health)


def _judge(views: StoreViews, now: float, stall_after: float, beats: list[Heartbeat]) -> Health:
    """The Health of a running system with fresh heartbeats (one per process;
    inside the snapshot): its last progress is the most recent of theirs."""
    oldest = oldest_due(views, now)
    progress_age = _age(now, max(beat.last_progress_at for beat in beats))
    healthy, reason = judge(
        oldest_pending_age=oldest, last_progress_age=progress_age, stall_after=stall_after
    )
    counts = views.counts(now)
    handed = views.claimed().count  # (counted as pending, as statistics() does)
    return Health(
        healthy=healthy,
        reason=reason,
        checked_at=now,
        stall_after=stall_after,
        oldest_pending_age=oldest,
        last_progress_age=progress_age,
        pending=counts.pending + handed,
        in_flight=counts.claimed - handed,
        dead=counts.dead,
        processed=sum(beat.processed for beat in beats),
        dead_lettered=sum(beat.dead_lettered for beat in beats),
    )
