"""A process's part in a cluster: its leases, and the notices of work for it.

``PgCluster.run`` is a task of the running system. It keeps the leases
(postgres_leases.py) every quarter of ``lease_ttl``, on a connection of its
own, and acts on what a round finds, through the system's
:class:`~actors.store.protocol.ClusterHost`:

- buckets taken by another process (or refused by a fence) are *lost*: the
  handlers still running there are cancelled at once, since every write they
  would make is refused;
- buckets gained are looked at for work, and their sessions get actors;
- buckets beyond this process's share are *left*: no handler starts there
  any more, their actors finish and leave, and the buckets are given back
  once none is left (a clean handover: nothing runs twice);
- if renewing fails for long enough that the leases could run out, every
  bucket is dropped as lost, before another process can take them over.

A listener thread (:class:`Listener`) waits for ``NOTIFY`` on its own
connection, and hands the sessions with work in this process's buckets to
the system (``ClusterHost.work_found``) through the trio token.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import psycopg
import trio

from . import postgres_leases as leases
from .errors import StoreError
from .postgres_ops import (
    KILL_CHANNEL,
    NOTIFY_CHANNEL,
    OUTPUT_CHANNEL,
    REPLY_CHANNEL,
    SUBSCRIBERS_CHANNEL,
    announce,
)
from .postgres_ownership import Ownership, OwnershipStatistics
from .postgres_schema import connect
from .postgres_url import redact
from .protocol import ClusterHost
from .records import DatabaseCounts

log = logging.getLogger("actors.cluster")

# Sessions handed over per look; more are left to Store.sessions_with_work.
LOOK_LIMIT = 1000
# Reads of the counts while this process's own change under them.
COUNT_TRIES = 3
# Tries of a read (counts, subscriptions) over a lost connection.
READ_TRIES = 5
# Buckets given back per round beyond the fair share, as a fraction of all.
RELEASE_STEP = 16


def new_member_id() -> str:
    """A process's name in the cluster: unique, never reused."""
    return uuid.uuid4().hex


class PgCluster:
    """The leases and notices of one process (see the module)."""

    def __init__(
        self,
        url: str,
        own: Ownership,
        lease_ttl: float,
        *,
        inline: bool,
        remote_asks: dict[int, str],
        post_replies: Callable[[list[tuple[int, str, str]]], None],
        post_outputs: Callable[[list[tuple[str, str, str]]], None],
        after_commits: Callable[[Callable[[], None]], None],
        post_kill: Callable[[str], bool],
        processed: Callable[[], int],
    ) -> None:
        self._processed = processed
        self.kill_elsewhere = post_kill
        self._after_commits = after_commits
        self._post_outputs = post_outputs
        # This process's subscribed sessions, and what the database was told.
        self._listening: set[str] = set()
        self._told: set[str] = set()
        self._subs_changed = trio.Event()  # ours changed, or another member's did
        # {session: other members that subscribe to it}, as last read.
        self._listeners: dict[str, list[str]] = {}
        self._url = url
        self._remote_asks = remote_asks
        self._post_replies = post_replies
        self._counts = DatabaseCounts(pending=0, in_flight=0, dead=0, processed=0)
        # The host's local counts when _counts was read (see counts()).
        self._base = self._counts
        self._counts_wanted = trio.Event()
        self.own = own
        self._ttl = lease_ttl
        self._inline = inline
        self._period = lease_ttl / 4
        self._conn: psycopg.Connection[Any] | None = None
        self._poke = trio.Event()
        self._host: ClusterHost | None = None
        self._listener: Listener | None = None
        self._leaving_deadline = math.inf  # when leaving buckets' handlers get cancelled
        self.rounds = 0
        self.failed_rounds = 0
        self._round_done = trio.Event()  # set (and replaced) after each round

    def owns(self, session_id: str) -> bool:
        return self.own.owns(session_id)

    def may_start(self) -> bool:
        return self.own.may_start()

    def statistics(self) -> OwnershipStatistics:
        """This process's buckets, lease rounds and notices."""
        listener = self._listener
        return attrs.evolve(
            self.own.statistics(),
            rounds=self.rounds,
            failed_rounds=self.failed_rounds,
            notices=listener.notices if listener is not None else 0,
            looks=listener.looks if listener is not None else 0,
        )

    # -- asks of other processes, and the database's counts --------------------

    @property
    def remote_asks(self) -> Mapping[int, str]:
        return self._remote_asks

    def answer(self, message_id: int, outcome: str) -> None:
        asker = self._remote_asks.pop(message_id, None)
        if asker is not None:
            self._post_replies([(message_id, asker, outcome)])

    def subscribed(self, session_id: str, listening: bool) -> None:
        if listening:
            self._listening.add(session_id)
        else:
            self._listening.discard(session_id)
        self._subs_changed.set()

    def forward(self, session_id: str, outcome: str) -> None:
        members = self._listeners.get(session_id)
        if members:
            self._post_outputs([(m, session_id, outcome) for m in members])

    def subscribers_changed(self) -> None:
        """Another member's subscriptions changed (the listener's notice)."""
        self._subs_changed.set()

    async def _subscriptions_loop(self) -> None:
        """Keep the database told of ours, and ourselves of the others'."""
        while True:
            await self._subs_changed.wait()
            self._subs_changed = trio.Event()
            try:
                await self._sync_subscriptions()
            except (psycopg.Error, OSError, StoreError) as exc:
                self._drop_connection()
                log.warning("updating the subscriptions failed (retried): %s", exc)
                self._subs_changed.set()
                await trio.sleep(self._period)

    async def _sync_subscriptions(self) -> None:
        added = sorted(self._listening - self._told)
        gone = sorted(self._told - self._listening)
        conn = self._connection()
        if added or gone:
            await self._db(leases.subscribe, conn, self.own.member, added, gone)
            self._told = (self._told | set(added)) - set(gone)
        self._listeners = await self._db(leases.subscribers, conn, self.own.member)
        assert self._host is not None
        self._host.remote_listeners(frozenset(self._listeners))

    def counts(self) -> DatabaseCounts:
        self._counts_wanted.set()
        if self._host is None:
            return self._counts
        # What this process changed since the read is known at once: a
        # statistics() right after a send or an ack shows it.
        now, base, read = self._host.local_counts(), self._base, self._counts
        # Claimed here but not started: pending, as one process counts them
        # (another process's are in flight: no start table says otherwise).
        handed = self._host.handed_here()
        return DatabaseCounts(
            pending=max(0, read.pending + now.pending - base.pending + handed),
            in_flight=max(0, read.in_flight + now.in_flight - base.in_flight - handed),
            dead=max(0, read.dead + now.dead - base.dead),
            processed=read.processed + now.processed,  # (the others', and ours)
        )

    async def refresh_counts(self) -> DatabaseCounts:
        """Read the whole database's counts now.

        Raises:
          StoreError: the database could not be read (after a few tries).
        """
        host = self._host
        for _ in range(COUNT_TRIES):
            # This process's changes made while the read ran may or may not
            # be in it: read again until none came in between.
            base = host.local_counts() if host is not None else self._base
            read: DatabaseCounts = await self._read(leases.count_all, self.own.member)
            after = host.local_counts() if host is not None else base
            if after == base:
                break
        self._counts, self._base = read, after
        return read

    async def _count_loop(self) -> None:
        """Read the counts when statistics() asked for them, at most ten times a second."""
        while True:
            await self._counts_wanted.wait()
            self._counts_wanted = trio.Event()
            try:
                await self.refresh_counts()
            except (psycopg.Error, OSError, StoreError) as exc:
                log.debug("reading the database's counts failed: %s", exc)
            await trio.sleep(0.1)

    async def next_round(self) -> None:
        """Wait until the keeper has finished its next round (renewed, rebalanced)."""
        await self._round_done.wait()

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(connection, *args)``, reconnecting (a few times) if the connection was lost."""
        for attempt in range(READ_TRIES):
            try:
                return await self._db(lambda: fn(self._connection(), *args))
            except (psycopg.OperationalError, psycopg.InterfaceError, StoreError) as exc:
                self._drop_connection()
                if attempt == READ_TRIES - 1:
                    raise StoreError(f"cannot read {redact(self._url)}: {exc}") from exc
                await trio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._inline:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._url, autocommit=True, what="cannot connect (leases)")
        return self._conn

    # -- the task ----------------------------------------------------------

    async def run(
        self, host: ClusterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the leases until cancelled; started once the first round took a share."""
        self._host = host
        token = trio.lowlevel.current_trio_token()
        self.own.want_round = lambda: token.run_sync_soon(self._poke.set)
        await self._db(lambda: leases.join(self._connection(), self.own.member, self._ttl))
        self._listener = Listener(self._url, self.own, host, token, self.subscribers_changed)
        self._listener.start()
        try:
            await self._round()
            await self.refresh_counts()
            await self._sync_subscriptions()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._count_loop)
                nursery.start_soon(self._subscriptions_loop)
                task_status.started()
                while True:
                    with trio.move_on_after(self._period):
                        await self._poke.wait()
                    self._poke = trio.Event()
                    await self._round()
        finally:
            self._listener.stop()

    async def _round(self) -> None:
        try:
            await self._keep()
        finally:
            self._round_done.set()
            self._round_done = trio.Event()

    async def _keep(self) -> None:
        started = time.monotonic()
        try:
            found: leases.Round = await self._db(
                leases.renew,
                self._connection(),
                self.own.member,
                self._ttl,
                self.own.buckets,
                self._processed(),
            )
        except (psycopg.Error, OSError, StoreError) as exc:
            self._round_failed(exc)
            return
        self.rounds += 1
        self.own.valid_until = started + self._ttl * 0.75
        if self.own.stale_seen:
            # Actors left on a stale lease: their sessions' work is looked for again.
            self.own.stale_seen = False
            assert self._listener is not None
            self._listener.look(set(self.own.owned))
        lost = self._apply_renewal(found.held)
        try:
            if lost:
                await self._tell_owners(lost)
            # Rows still naming this process for buckets it dropped (its
            # renewals failed for too long, or a fence found them lost while
            # the renewal kept them): given back, so that a taker, this
            # process included, recovers what their dropped actors left.
            stray = sorted(set(found.held) - set(self.own.owned))
            if stray:
                await self._db(leases.give_back, self._connection(), self.own.member, stray)
                await self._tell_owners(set(stray))
            await self._rebalance(found)
            if self.rounds % 40 == 1:
                await self._db(leases.forget_members, self._connection())
        except (psycopg.Error, OSError, StoreError) as exc:
            # (The leases were renewed: the next round takes or gives back.)
            self._drop_connection()
            log.warning("rebalancing the buckets failed (next round): %s", exc)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _round_failed(self, exc: BaseException) -> None:
        self.failed_rounds += 1
        self._drop_connection()
        log.warning("renewing the leases on %s failed: %s", redact(self._url), exc)
        # Stop starting handlers before the leases can run out (a quarter
        # of the time to live ahead: that is when claims stop anyway).
        if self.own.owned and time.monotonic() >= self.own.valid_until - self._period:
            log.error("the leases could not be renewed in time: dropping every bucket")
            self._lose(set(self.own.owned))

    def _apply_renewal(self, held: dict[int, int]) -> set[int]:
        """Drop the buckets the renewal found taken by another process; returns them."""
        owned = self.own.owned
        lost = {b for b, epoch in owned.items() if held.get(b) != epoch}
        if lost:
            log.warning(
                "lost %d bucket(s) to another process: cancelling their handlers", len(lost)
            )
            self._lose(lost)
        return lost

    async def _commits_submitted(self) -> None:
        """Wait until every operation submitted to the store so far has committed."""
        committed = trio.Event()
        self._after_commits(committed.set)
        await committed.wait()

    async def _tell_owners(self, dropped: set[int]) -> None:
        """Announce ``dropped`` (no longer this process's) once every send
        submitted until now has committed.

        A send decides whether to announce its buckets in its transaction,
        and sends take no fence: one that saw a bucket held, and committed
        after another process took the bucket over and looked for work there,
        told nobody of its message. From now on a send announces these
        buckets; the notice covers those before.
        """
        await self._commits_submitted()
        await self._db(lambda: announce(self._connection(), sorted(dropped), delayed=True))

    def _lose(self, lost: set[int]) -> None:
        own = self.own
        own.owned = {b: e for b, e in own.owned.items() if b not in lost}
        own.leaving -= lost
        own.lost += len(lost)
        assert self._host is not None
        self._host.drop_sessions(lambda s: own.bucket(s) in lost, hard=True)

    async def _rebalance(self, found: leases.Round) -> None:
        own = self.own
        held = len(own.owned)
        if held < found.target and not own.leaving:
            gained: dict[int, int] = await self._db(
                leases.take, self._connection(), own.member, self._ttl, found.target - held
            )
            if gained:
                own.owned = {**own.owned, **gained}
                own.gained += len(gained)
                assert self._listener is not None
                self._listener.look(set(gained))
        elif held > found.target and not own.leaving:
            self._leave_some(held - found.target)
        if own.leaving:
            if trio.current_time() >= self._leaving_deadline:
                # A handler that runs on and on must not hold the handover
                # (nor the sessions of its bucket) hostage: cancelled, its
                # message runs again on the new owner.
                assert self._host is not None
                self._host.drop_sessions(lambda s: own.bucket(s) in own.leaving, hard=True)
            await self._give_back_idle()

    def _leave_some(self, excess: int) -> None:
        """Start handing over up to a step of buckets, busy and idle ones in
        the proportion this process holds them.

        Idle buckets go back at once, busy ones once their actors left: the
        first ones chosen are idle. But handing over only idle buckets would
        leave the work where it was: a process that joins would get the
        buckets without the sessions (with 120 busy sessions in 1,024
        buckets, every bucket it took was idle).
        """
        own = self.own
        assert self._host is not None
        busy = {own.bucket(s) for s in self._host.live_sessions()}
        idle = sorted(b for b in own.owned if b not in busy)
        held_busy = sorted(b for b in own.owned if b in busy)
        count = min(excess, max(1, own.buckets // RELEASE_STEP))
        # (Rounded up: one busy bucket goes in any step while some are held.)
        take_busy = min(len(held_busy), -(-count * len(held_busy) // len(own.owned)))
        take_idle = min(len(idle), count - take_busy)
        take_busy = count - take_idle  # (all busy if too few are idle)
        own.leaving = set(idle[:take_idle]) | set(held_busy[:take_busy])
        self._leaving_deadline = trio.current_time() + self._ttl
        self._host.drop_sessions(lambda s: own.bucket(s) in own.leaving, hard=False)

    async def _give_back_idle(self) -> None:
        """Give back the leaving buckets in which no actor is left."""
        own = self.own
        assert self._host is not None
        busy = {own.bucket(s) for s in self._host.live_sessions()}
        idle = sorted(own.leaving - busy)
        if not idle:
            return
        # An actor leaves once its last ack is submitted, not committed: a
        # bucket given back first would have that ack refused, and its
        # message run again by the next owner.
        await self._commits_submitted()
        await self._db(leases.give_back, self._connection(), own.member, idle)
        own.owned = {b: e for b, e in own.owned.items() if b not in idle}
        own.leaving -= set(idle)
        own.released += len(idle)

    async def leave(self) -> None:
        """A clean stop (after every actor left): give every bucket back at once."""
        own = self.own
        try:
            await self._db(leases.leave, self._connection(), own.member, self._processed())
        except (psycopg.Error, OSError) as exc:
            log.warning("giving the buckets back failed (they expire instead): %s", exc)
        own.released += len(own.owned)
        own.owned = {}
        own.leaving = set()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Listener:
    """A thread that waits for notices of work and hands it to the system."""

    def __init__(
        self,
        url: str,
        own: Ownership,
        host: ClusterHost,
        token: trio.lowlevel.TrioToken,
        subscribers_changed: Callable[[], None],
    ) -> None:
        self._subscribers_changed = subscribers_changed
        self._url = url
        self._own = own
        self._host = host
        self._token = token
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._wanted: set[int] = set()  # buckets to look at (gained), any thread
        self._thread = threading.Thread(target=self._main, name="actors-listen", daemon=True)
        self.notices = 0
        self.looks = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def look(self, buckets: set[int]) -> None:
        """Look at ``buckets`` for work soon (any thread)."""
        with self._lock:
            self._wanted |= buckets

    def _main(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    for channel in (
                        REPLY_CHANNEL,
                        OUTPUT_CHANNEL,
                        SUBSCRIBERS_CHANNEL,
                        KILL_CHANNEL,
                    ):
                        conn.execute(f"LISTEN {channel}")
                    self.look(set(self._own.owned))  # what was sent while not listening
                    self._take_replies(conn)
                    self._take_outputs(conn)
                    self._listen(conn)
            except (psycopg.Error, OSError) as exc:
                if self._stopping.is_set():
                    return
                log.warning("listening for work failed (reconnecting): %s", exc)
                self._stopping.wait(1.0)
            except trio.RunFinishedError:
                return

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stopping.is_set():
            buckets: set[int] = set()
            sessions: set[str] = set()
            replies = outputs = subscribers = delayed = False
            # (Never leave the generator early: notices that came in the
            # same packet as the first would be lost. Nor query inside it:
            # it holds the connection.)
            for notice in conn.notifies(timeout=0.25, stop_after=1):
                self.notices += 1
                mine = notice.payload == self._own.member
                if notice.channel == REPLY_CHANNEL:
                    replies = replies or mine
                    continue
                if notice.channel == OUTPUT_CHANNEL:
                    outputs = outputs or mine
                    continue
                if notice.channel == SUBSCRIBERS_CHANNEL:
                    subscribers = subscribers or not mine
                    continue
                if notice.channel == KILL_CHANNEL:
                    if self._own.owns(notice.payload):
                        self._token.run_sync_soon(self._host.kill, notice.payload)
                    continue
                payload = notice.payload
                if payload.startswith("s"):  # (the sessions themselves: Operations.notice)
                    sessions.update(s for s in json.loads(payload[1:]) if self._own.owns(s))
                    continue
                if payload.startswith("d"):  # (delayed messages came: the timer looks)
                    delayed, payload = True, payload[1:]
                if payload == "*":
                    buckets |= set(self._own.owned)
                else:
                    buckets.update(int(b) for b in payload.split(",") if b)
            if replies:
                self._take_replies(conn)
            if outputs:
                self._take_outputs(conn)
            if subscribers:
                self._token.run_sync_soon(self._subscribers_changed)
            if sessions:
                found: list[tuple[str, float | None]] = [(s, None) for s in sorted(sessions)]
                self._token.run_sync_soon(self._host.work_found, found, False, False)
            with self._lock:
                wanted, self._wanted = self._wanted, set()
            buckets |= wanted  # (gained buckets: delayed messages may be there)
            own = self._own
            held = [b for b in buckets if b in own.owned and b not in own.leaving]
            if held:
                self._look_at(conn, held, delayed or bool(wanted))

    def _look_at(self, conn: psycopg.Connection[Any], buckets: list[int], delayed: bool) -> None:
        self.looks += 1
        sessions, more = leases.waiting_sessions(conn, buckets, LOOK_LIMIT)
        if sessions or more or delayed:
            self._token.run_sync_soon(self._host.work_found, sessions, more, delayed)

    def _take_outputs(self, conn: psycopg.Connection[Any]) -> None:
        outputs = leases.take_outputs(conn, self._own.member)
        if outputs:
            self._token.run_sync_soon(self._host.outputs_arrived, outputs)

    def _take_replies(self, conn: psycopg.Connection[Any]) -> None:
        replies = leases.take_replies(conn, self._own.member)
        if replies:
            self._token.run_sync_soon(self._host.replies_arrived, replies)
