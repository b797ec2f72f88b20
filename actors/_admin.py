"""Read-only views of a database for the command line: status, sessions, dead letters.

Everything here reads through a read-only connection of its own, with a
busy timeout. The database is in WAL mode, so a reader never blocks the
running system's writer and the writer never blocks a reader: reads work
while a system runs, and neither makes the other fail with "database is
locked". Each view reads in one transaction (a consistent snapshot) and
returns plain frozen records, which the command line prints as tables or
as JSON.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apsw
import attrs

from ._health import HEARTBEAT_KEY, Health, Heartbeat, judge, seconds_text
from ._lock import is_held, lock_file
from ._records import DeadLetter
from ._starts import database_identity, read_marks, starts_file
from ._store import SCHEMA_VERSION, Store, database_path


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


def _age(now: float, value: object) -> float:
    assert isinstance(value, int | float), value
    return max(now - value, 0.0)


class AdminError(Exception):
    """The database cannot be used: missing, not an actors database, or too new."""


def open_readonly(path: str, busy_timeout: float = 5.0) -> apsw.Connection:
    """Open an existing actors database read-only.

    Raises:
      AdminError: no such file, not an SQLite database, no actors schema,
        or a schema newer than this version of actors.
    """
    if not os.path.isfile(path):
        raise AdminError(f"no database file at {path!r}")
    try:
        db = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise AdminError(f"cannot open {path!r}: {exc}") from exc
    try:
        db.set_busy_timeout(int(busy_timeout * 1000))
        version = db.execute("PRAGMA user_version").fetchall()[0][0]
        tables = {
            str(name)
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    except apsw.Error as exc:
        db.close()
        raise AdminError(f"{path!r} is not an actors database: {exc}") from exc
    if not isinstance(version, int) or version < 1 or "messages" not in tables:
        db.close()
        raise AdminError(f"{path!r} is not an actors database (it has no actors schema)")
    if version > SCHEMA_VERSION:
        db.close()
        raise AdminError(
            f"{path!r} has schema version {version}, newer than this version of actors"
            f" understands ({SCHEMA_VERSION}); upgrade actors"
        )
    return db


@contextmanager
def snapshot(db: apsw.Connection) -> Iterator[apsw.Connection]:
    """One read transaction: every query inside sees the same state."""
    db.execute("BEGIN")
    try:
        yield db
    finally:
        db.execute("ROLLBACK")


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


def read_heartbeat(db: apsw.Connection) -> Heartbeat | None:
    """The last heartbeat a running system wrote, if any."""
    rows = db.execute("SELECT value FROM meta WHERE key = ?", (HEARTBEAT_KEY,)).fetchall()
    return Heartbeat.from_json(rows[0][0]) if rows else None


STALE_FLOOR = 10.0  # seconds: a heartbeat younger than this is never stale


def default_stale_after(heartbeat: Heartbeat) -> float:
    """The default age at which a heartbeat means the system is stuck:
    the larger of 10 s and 5 heartbeat intervals."""
    return max(STALE_FLOOR, 5 * heartbeat.interval)


def oldest_due(db: apsw.Connection, now: float) -> float | None:
    """Age of the oldest message that is due (pending, not waiting for a delay
    or a retry) or in flight; None if there is none. As Store.op_oldest_due."""
    rows = db.execute(
        "SELECT min(enqueued_at) FROM messages WHERE state < 2 AND seq IS NOT NULL"
        " AND (not_before IS NULL OR not_before <= ?)",
        (now,),
    ).fetchall()
    oldest = rows[0][0]
    return None if oldest is None else _age(now, oldest)


@attrs.frozen(kw_only=True)
class SessionRow:
    """One session's messages by state (``actors sessions``, ``actors status``).

    ``in_flight``: messages whose handler has started (see :func:`claimed`);
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
class Status:
    """The state of a database (``actors status``).

    ``running``: a system holds the database's lock (see :func:`is_running`).
    ``pending`` counts every message waiting in the database; of them
    ``delayed`` wait for their delay, ``retry_waiting`` for a retry
    deadline, and the rest are due. ``handed`` and ``in_flight`` are as in
    :func:`claimed` (``statistics().pending`` of the running system counts
    the handed ones as pending). ``oldest_pending_age`` is as in Health. ``attempts`` maps an
    attempt count to how many pending or in-flight messages have used that
    many (a message with 2 or more has been retried). ``sessions`` are the
    deepest queues, at most the limit asked for, of ``session_count``.
    ``heartbeat`` is the last one a system wrote (old, or from a system
    that stopped, when ``running`` is false).
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


# Attempts a message has used: a handed message's claim counted one that its
# handler has not started (recovery would give it back). The parameter is
# the JSON array of handed ids (Claimed.handed_ids).
_USED = "(attempts - (id IN (SELECT value FROM json_each(?))))"
_SESSIONS = (
    "SELECT session_id, sum(state = 0), sum(state = 1), sum(state = 2),"
    f" min(CASE WHEN state < 2 THEN enqueued_at END), max({_USED})"
    " FROM messages{where} GROUP BY session_id"
    " ORDER BY sum(state < 2) DESC, sum(state = 2) DESC, session_id LIMIT ?"
)


def starts_path(path: str) -> str:
    """The start table a system keeps beside the database (see ``_starts.py``),
    by its resolved path, as the store names it."""
    return starts_file(database_path(path))


@attrs.frozen
class Claimed:
    """The claimed messages (``state`` 1) whose handler has not started.

    ``handed``: how many per session; ``handed_ids``: their ids. Every
    other claimed message is in flight.
    """

    handed: dict[str, int]
    handed_ids: list[int]

    @property
    def count(self) -> int:
        return len(self.handed_ids)


def claimed(db: apsw.Connection, path: str) -> Claimed:
    """Tell the claimed messages whose handler started from the ones merely handed.

    The database marks a message claimed (``state`` 1) when an actor takes
    it, and an actor takes more than the one it runs: messages claimed on
    delivery or in bulk wait in its memory, not started. The start table
    (``<db>.starts``, see ``_starts.py``) holds, per live actor, the id of
    the last message whose handler started, and a session's messages run in
    order: every claimed message of that session up to it (in the session's
    order) has started (it runs, or it ran and its acknowledgement has not
    committed yet), and every one after it is handed. This is the rule
    recovery applies after a crash, so for a process that died it tells
    what the next start will charge an attempt. Without a start table of
    this database, every claimed message counts as started, as recovery
    counts them. Read-only: the table is read, never written.

    Call inside the snapshot, after a first read: the marks are then at
    least as new as the snapshot (a message that started since may count
    as started a moment early, never the reverse).
    """
    try:
        marks = read_marks(starts_path(path), database_identity(path))
    except OSError:
        marks = None
    if marks is None:
        return Claimed({}, [])
    started: dict[str, int] = {
        str(session): _int(seq)
        for session, seq in db.execute(
            "SELECT session_id, max(seq) FROM messages WHERE state = 1"
            " AND id IN (SELECT value FROM json_each(?)) GROUP BY session_id",
            (json.dumps(marks),),
        )
    }
    handed: dict[str, int] = {}
    ids: list[int] = []
    for msg_id, session, seq in db.execute(
        "SELECT id, session_id, seq FROM messages WHERE state = 1 ORDER BY id"
    ):
        last = started.get(str(session))
        if last is None or (seq is not None and _int(seq) > last):
            ids.append(_int(msg_id))
            handed[str(session)] = handed.get(str(session), 0) + 1
    return Claimed(handed, ids)


def _sessions(
    db: apsw.Connection,
    now: float,
    limit: int,
    found: Claimed,
    session_id: str | None = None,
) -> list[SessionRow]:
    where, params = ("", ()) if session_id is None else (" WHERE session_id = ?", (session_id,))
    out = []
    for session, pending, claimed_, dead, oldest, attempts in db.execute(
        _SESSIONS.format(where=where), (json.dumps(found.handed_ids), *params, limit)
    ):
        handed = found.handed.get(str(session), 0)
        out.append(
            SessionRow(
                session_id=str(session),
                pending=_int(pending),
                handed=handed,
                in_flight=_int(claimed_) - handed,
                dead=_int(dead),
                oldest_age=None if oldest is None else _age(now, oldest),
                most_attempts=_int(attempts),
            )
        )
    return out


def _tables(db: apsw.Connection) -> set[str]:
    return {
        str(name) for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def status(
    db: apsw.Connection, path: str, now: float, *, limit: int = 20, running: bool = False
) -> Status:
    """Read the database's state in one snapshot (the deepest ``limit`` sessions).

    ``running``: whether a system runs on it (:func:`is_running`), as the caller found.
    """
    with snapshot(db):
        version = _int(db.execute("PRAGMA user_version").fetchall()[0][0])
        counts: dict[int, tuple[int, int, int]] = {
            _int(state): (_int(n), _int(delayed), _int(waiting))
            for state, n, delayed, waiting in db.execute(
                "SELECT state, count(*), count(CASE WHEN seq IS NULL THEN 1 END),"
                " count(CASE WHEN seq IS NOT NULL AND not_before > ? THEN 1 END)"
                " FROM messages GROUP BY state",
                (now,),
            )
        }
        session_count = _int(
            db.execute("SELECT count(DISTINCT session_id) FROM messages").fetchall()[0][0]
        )
        found = claimed(db, path)
        attempts = {
            _int(a): _int(n)
            for a, n in db.execute(
                f"SELECT {_USED} AS used, count(*) FROM messages WHERE state < 2 AND used > 0"
                " GROUP BY used ORDER BY used",
                (json.dumps(found.handed_ids),),
            )
        }
        pending = counts.get(0, (0, 0, 0))
        return Status(
            path=path,
            checked_at=now,
            running=running,
            schema_version=version,
            pending=pending[0],
            delayed=pending[1],
            retry_waiting=pending[2],
            handed=found.count,
            in_flight=counts.get(1, (0, 0, 0))[0] - found.count,
            dead=counts.get(2, (0, 0, 0))[0],
            oldest_pending_age=oldest_due(db, now),
            attempts=attempts,
            session_count=session_count,
            sessions=_sessions(db, now, limit, found),
            in_flight_messages=_in_flight(db, now, limit, found),
            open_requests=_open_requests(db),
            heartbeat=read_heartbeat(db),
        )


def _in_flight(db: apsw.Connection, now: float, limit: int, found: Claimed) -> list[InFlightRow]:
    """The messages in flight, oldest first (handed ones count as pending)."""
    return [
        InFlightRow(
            id=_int(i),
            session_id=str(s),
            attempt=_int(a),
            age=_age(now, t),
        )
        for i, s, a, t in db.execute(
            "SELECT id, session_id, attempts, enqueued_at FROM messages WHERE state = 1"
            " AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
            (json.dumps(found.handed_ids), limit),
        )
    ]


def _open_requests(db: apsw.Connection) -> int:
    """Control requests not answered yet (0 on a database without the table)."""
    if "control" not in _tables(db):
        return 0
    return _int(db.execute("SELECT count(*) FROM control WHERE done_at IS NULL").fetchall()[0][0])


def sessions(
    db: apsw.Connection,
    path: str,
    now: float,
    *,
    limit: int = 100,
    session_id: str | None = None,
) -> tuple[list[SessionRow], int]:
    """Sessions with messages, deepest queue first (only ``session_id`` if given),
    and how many sessions have messages (of which at most ``limit`` are listed)."""
    where, params = ("", ()) if session_id is None else (" WHERE session_id = ?", (session_id,))
    with snapshot(db):
        count = _int(
            db.execute(
                f"SELECT count(DISTINCT session_id) FROM messages{where}", params
            ).fetchall()[0][0]
        )
        return _sessions(db, now, limit, claimed(db, path), session_id), count


def dead_letters(
    db: apsw.Connection, session_id: str | None = None, limit: int | None = None
) -> tuple[list[DeadLetter], int]:
    """Dead letters, oldest first (the same reader as ``System.dead_letters()``),
    and how many there are (of which at most ``limit`` are listed)."""
    where, params = ("", ()) if session_id is None else (" AND session_id = ?", (session_id,))
    with snapshot(db):
        count = _int(
            db.execute(f"SELECT count(*) FROM messages WHERE state = 2{where}", params).fetchall()[
                0
            ][0]
        )
        return Store._read_dead_letters(db, session_id, limit), count


def counts(db: apsw.Connection, handed: int = 0) -> dict[str, int]:
    """Messages by state, as ``statistics()`` counts them: ``{"pending": n, "in_flight": n,
    "dead": n}``; ``handed`` claimed messages (see :func:`claimed`) count as pending."""
    found = {
        _int(s): _int(n)
        for s, n in db.execute("SELECT state, count(*) FROM messages GROUP BY state")
    }
    return {
        "pending": found.get(0, 0) + handed,
        "in_flight": found.get(1, 0) - handed,
        "dead": found.get(2, 0),
    }


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

    ``running``: a system holds the database's lock. ``heartbeat_age``:
    seconds since its last heartbeat (None without one). ``health``: the
    judgement from that heartbeat and the database (None when there is no
    fresh heartbeat to judge by).
    """

    path: str
    running: bool
    healthy: bool
    reason: str
    heartbeat_age: float | None
    stale_after: float | None
    health: Health | None


def check_health(
    db: apsw.Connection,
    path: str,
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
    with snapshot(db):
        heartbeat = read_heartbeat(db)
        age = None if heartbeat is None else max(now - heartbeat.at, 0.0)
        stale = None
        if heartbeat is not None:
            stale = stale_after if stale_after is not None else default_stale_after(heartbeat)

        def verdict(healthy: bool, reason: str, health: Health | None = None) -> HealthReport:
            return HealthReport(
                path=path,
                running=running,
                healthy=healthy,
                reason=reason,
                heartbeat_age=age,
                stale_after=stale,
                health=health,
            )

        if not running:
            last = "" if age is None else f" (last heartbeat {seconds_text(age)} ago)"
            return verdict(False, f"no system is running on {path}{last}")
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
        health = _running_health(db, path, now, heartbeat, stall_after)
        return verdict(health.healthy, health.reason, health)


def _running_health(
    db: apsw.Connection, path: str, now: float, heartbeat: Heartbeat, stall_after: float
) -> Health:
    """A running system's health, from its fresh heartbeat and the database now."""
    oldest = oldest_due(db, now)
    progress_age = max(now - heartbeat.last_progress_at, 0.0)
    healthy, reason = judge(
        oldest_pending_age=oldest, last_progress_age=progress_age, stall_after=stall_after
    )
    found = counts(db, claimed(db, path).count)
    return Health(
        healthy=healthy,
        reason=reason,
        checked_at=now,
        stall_after=stall_after,
        oldest_pending_age=oldest,
        last_progress_age=progress_age,
        pending=found["pending"],
        in_flight=found["in_flight"],
        dead=found["dead"],
        processed=heartbeat.processed,
        dead_lettered=heartbeat.dead_lettered,
    )
