"""The store boundary: what the runtime and the command line ask of a database.

:class:`Store` is what a running system uses; :class:`StoreViews` and
:class:`ControlRequests` are what the command line uses from another
process. Everything above this module is written against these protocols;
``SqliteStore`` (sqlite.py) implements them on an SQLite file, and another
backend implements them beside it.

Contract common to every asynchronous operation of :class:`Store`:

- **Durable when it returns.** An ``await store.x(...)`` returns once the
  operation's transaction has committed (with the durability the store
  was opened with); what it returns is what was committed. It raises
  :class:`~actors.StoreError` if that transaction failed, or if the store
  failed or closed earlier, and then nothing of it was written.
- **Submission order.** Operations commit in the order they were called,
  never one before an operation that was called before it, whatever task
  called it: so a claim that an actor calls after an ack it submitted sees
  that ack done. Operations called close together may share a transaction
  (group commit): all of them commit, or, if the group fails, each is
  retried alone, so one failure fails only its own caller. Two exceptions
  are stated where they apply: :meth:`Store.append` (sealed late, runs
  last in its group) and :meth:`Store.ack_soon` (joins an open box).
- **Not cancellable.** A caller cancelled while it waits still waits for
  the outcome, and sees the cancellation at its next checkpoint: it always
  learns what was written.
- **Fail fast, fail loud.** An operation that fails, awaited or not, marks
  the store failed: ``failed`` is set (the system watches it and stops),
  ``failure`` says why, and every later call raises StoreError.

The ``..._soon`` variants queue the same operation without waiting; they
keep submission order, and their failure fails the store as above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

import trio

from .._records import DeadLetter
from .records import (
    Aborted,
    Ack,
    AppendBatch,
    Appended,
    Claim,
    Claimed,
    ControlRequest,
    DatabaseCounts,
    DueWork,
    FailOutcome,
    InFlight,
    Membership,
    MessageCounts,
    Purged,
    Sent,
    SessionCounts,
    StoreStatistics,
)


class StartMarks(Protocol):
    """Which handler each live actor started last, kept through a process death.

    Runs on the trio thread. Recovery reads the marks at the next open to
    tell a claimed message whose handler had started (its attempt stays
    counted) from one that only waited in its actor's memory (its attempt
    is given back). See starts.py for the SQLite store's memory-mapped file.
    """

    def acquire(self) -> int:
        """A free slot for a new actor."""

    def mark(self, slot: int, message_id: int) -> None:
        """The handler of ``message_id`` is about to start. Survives a crash
        of the process when it returns (not a power loss); no system call."""

    def release(self, slot: int) -> None:
        """The slot's actor left and every ack it submitted has committed
        (see :meth:`Store.after_commits`)."""


class ClusterHost(Protocol):
    """What a clustered store tells the running system (the supervisor is one).

    Called on the trio thread, never blocking.
    """

    def work_found(
        self, sessions: list[tuple[str, float | None]], more: bool, delayed: bool
    ) -> None:
        """Sessions of buckets this process holds have work in the database
        that no send of this process announced (another process sent it, or
        the bucket was just taken over), with the epoch time their head waits
        until (None: it does not wait). ``more``: others may have too
        (:meth:`Store.sessions_with_work` finds them). ``delayed``: delayed
        messages may have come too (the timer looks again)."""

    def drop_sessions(self, which: Callable[[str], bool], hard: bool) -> None:
        """The sessions for which ``which(session_id)`` is true are no longer
        this process's to run. ``hard`` (the lease was lost: every write for
        them is refused): their handlers are cancelled now. Otherwise (the
        bucket is being handed over): no handler starts for them any more,
        running ones finish, and their actors leave."""

    def live_sessions(self) -> list[str]:
        """The sessions that have an actor in this process now."""

    def outputs_arrived(self, outputs: list[tuple[str, str]]) -> None:
        """Outputs (session, JSON: see _remote.py), in order, of sessions run in
        other processes, for this process's subscribers."""

    def remote_listeners(self, sessions: frozenset[str]) -> None:
        """The sessions that subscribers in other processes listen to now."""

    def local_counts(self) -> DatabaseCounts:
        """This process's running counts (what it sent, claimed, acknowledged,
        dead-lettered; ``in_flight`` is every claim it holds), whose changes
        since a read of the database are added to that read."""

    def handed_here(self) -> int:
        """Messages claimed by this process whose handler has not started:
        counted as pending, as a single process counts them."""

    def kill(self, session_id: str) -> bool:
        """Crash ``session_id``'s actor here, if it runs (another process asked)."""

    def replies_arrived(self, replies: list[tuple[int, str]]) -> None:
        """Outcomes (message id, JSON: see _remote.py) of messages this
        process's ``ask()`` waits for, written by the processes that ran them."""


class Cluster(Protocol):
    """A store shared by several processes: which sessions this one runs."""

    def owns(self, session_id: str) -> bool:
        """Whether this process runs ``session_id``'s handlers now (cheap, trio thread)."""

    async def run(
        self, host: ClusterHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep this process's share of the sessions until cancelled; started
        once it took its first share. Tells ``host`` what changes."""

    @property
    def remote_asks(self) -> Mapping[int, str]:
        """Claimed messages that an ``ask()`` of another process waits for (by id)."""

    def answer(self, message_id: int, outcome: str) -> None:
        """Send the outcome (JSON: see _remote.py) of a message in
        ``remote_asks`` to the process that asked (without waiting)."""

    def subscribed(self, session_id: str, listening: bool) -> None:
        """This process's first subscriber of ``session_id`` came (``listening``),
        or its last one left: the other processes learn of it soon."""

    def forward(self, session_id: str, outcome: str) -> None:
        """Send an output (JSON: see _remote.py) of ``session_id`` to the other
        processes that listen to it (without waiting)."""

    def kill_elsewhere(self, session_id: str) -> bool:
        """Ask the process that runs ``session_id`` to kill its actor (without
        waiting); False if the store cannot send the request now."""

    def may_start(self) -> bool:
        """Whether this process's leases are fresh enough to start a handler
        (a process frozen or cut off past them must not: its buckets may be
        another's by now). Cheap: a clock read, on the trio thread."""

    def counts(self) -> DatabaseCounts:
        """The whole database's counts: as last read, plus this process's
        changes since (``ClusterHost.local_counts``). Asks for a fresh read."""

    async def refresh_counts(self) -> DatabaseCounts:
        """Read the whole database's counts now."""


class Store(Protocol):
    """The database behind a running system (see the module for the common contract)."""

    # -- what it is ------------------------------------------------------------

    @property
    def path(self) -> str:
        """Where the database is (for messages)."""

    @property
    def max_value_bytes(self) -> int:
        """The largest value (a body, ``ctx.state``'s text) a message or state
        row holds, in bytes. A larger one would fail its transaction, and so
        the store: callers refuse it before it reaches the store."""

    @property
    def may_have_state(self) -> bool:
        """False while no session has ``ctx.state`` in the database: a state
        read would find nothing (an activation skips it). Read on the trio
        thread; True once any state may have been written."""

    @property
    def next_seq(self) -> int:
        """The seq the next queued message will take: a mark of "now" in
        queue order. Read on the trio thread it may lag a transaction being
        committed (the supervisor's fair rotation needs no more)."""

    @property
    def starts(self) -> StartMarks | None:
        """The start table, or None if the store keeps none (every claimed
        message then counts as started after a crash)."""

    @property
    def cluster(self) -> Cluster | None:
        """The cluster this store shares its database with, or None (one process
        owns the database: every session is its own)."""

    @property
    def failed(self) -> trio.Event:
        """Set once the store has failed (an operation, the committer, or
        :meth:`check_file`); it never clears."""

    @property
    def failure(self) -> BaseException | None:
        """The first error the store failed with, or None."""

    def use_clock(self, now: Callable[[], float]) -> None:
        """Read epoch time from ``now`` (the running system's clock) when
        writing when a wait began; before this, the wall clock."""

    def statistics(self) -> StoreStatistics:
        """Counters since the store opened."""

    def check_file(self) -> None:
        """Fail the store if its database is no longer the one it opened
        (the file was deleted or replaced): what it wrote since would be
        lost to the next start. Cheap (one ``stat``); the heartbeat calls it.

        Raises:
          StoreError: the database is gone or replaced (the store is failed).
        """

    async def aclose(self) -> None:
        """Commit every queued operation, then close. Idempotent; shielded.

        When it returns, everything any operation was acknowledged for is
        durable, and later calls raise StoreError.
        """

    # -- sends -------------------------------------------------------------------

    async def append(
        self,
        seal: Callable[[], AppendBatch],
        *,
        committed: Callable[[Appended], None] | None = None,
    ) -> Appended:
        """Insert a batch of sends, in order; returns its first id and the duplicates.

        Sealed late: ``seal()`` runs on the trio thread as the store starts
        the transaction that will write the batch, and the insert runs last
        in it, after every operation called before the seal (not only before
        this call): as if called at that moment. So a batch holds every send
        made until its transaction starts, and a claim called before the
        seal cannot see messages inserted claimed for its actor.

        Ids are ``first + index``, consecutive and never reused, and so are
        the seqs (a delayed message gets its seq when its delay ends).
        An index in ``batch.claimed`` is inserted claimed (in flight, attempt
        1: claim on delivery), unless its session has a pending message,
        which it must not overtake: such indices are removed from
        ``claimed`` and inserted pending. A keyed send whose (session, key)
        was sent before, and whose message is still pending, in flight or
        dead, or was processed less than ``key_retention`` seconds ago, is
        not inserted: the duplicates map its index to the first message's
        id. ``batch.asked`` lists the indices an ``ask()`` of this process
        waits for (a store shared by several processes sends their answers
        back here). ``committed(result)`` runs on the trio thread as the commit is
        reported, before any task waiting on that transaction resumes.
        """

    # -- claims and acknowledgements ------------------------------------------------

    async def claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool = False,
        bulk: int = 0,
    ) -> Claim:
        """Acknowledge ``ack`` (if given), then claim the session's head message.

        When it returns, the ack and the claim, with its attempt counted,
        are durable: the attempt is on disk before any handler runs. The
        head is the session's queued message of lowest seq (the caller holds
        no claim of the session); if its wait (``not_before``) has not passed
        at epoch ``now``, nothing is claimed and ``Claim.wait_until`` says
        until when. A head whose attempts
        were used up by deaths of the process, or whose body cannot be
        decoded, is dead-lettered on the way (``Claim.dead``). A crash
        suspect on its last attempt is not claimed unless ``alone``
        (``Claim.alone``: the caller must hold every other handler back).
        With ``want_state`` the claim carries the session's state, read
        after the ack's own write. With ``bulk``, up to that many first
        deliveries queued right behind the head are claimed too, in order
        (``Claim.extra``); the first that is not a first delivery ends the run.
        """

    async def load_state(self, session_id: str) -> str | None:
        """The session's state (JSON text), or None: as committed by every
        operation called before this one (acks submitted without waiting
        included)."""

    async def ack(self, ack: int | Ack) -> Sent | None:
        """Delete a processed message, and write its Ack (state, outbox, key)
        in the same transaction; a :class:`BatchAck` deletes every message of
        its batch (and marks their keys) in that transaction too. Returns the
        (session, seq) of the messages its outbox inserted, or None."""

    def ack_soon(self, ack: int | Ack, done: Callable[[tuple[int, Sent | None]], None]) -> None:
        """Queue an ack without waiting; acks queued close together share one operation.

        ``done((count, sent))`` runs on the trio thread after the commit,
        once per shared operation: ``count`` messages acked (a
        :class:`BatchAck` counts each of its batch), and the (session, seq) of
        the messages their outboxes inserted (or None). An ack joins the
        open box, which sits in the order where its first ack was queued: it
        may commit before operations called after that one but before it,
        never before an operation the acking task called earlier, which is
        what order per session needs; every later operation of that task
        commits after it.

        Raises:
          StoreError: the store failed or closed.
        """

    async def fail(
        self, message_id: int, error: str, retry_at: float, max_attempts: int
    ) -> FailOutcome:
        """Record a failed attempt: back to pending at the head of its queue,
        due at epoch ``retry_at`` ("retry"), or dead-lettered with ``error``
        when its attempts are used up ("dead"); "gone" if there is no such
        message (aborted or purged meanwhile). Durable when it returns."""

    async def release(self, message_id: int, uncount: bool, crashed: bool) -> None:
        """Put an in-flight message back to pending, at the head of its queue.

        ``uncount`` gives the claim's attempt back: no handler started for
        it. ``crashed`` marks an attempt that ended with no outcome (a
        KeyboardInterrupt or SystemExit escaped the handler), as after a
        dead process. Nothing happens to a message that is not in flight.
        """

    async def release_many(self, message_ids: list[int]) -> None:
        """Give back claims whose handler never started (claimed on delivery
        or in bulk, unused): pending again, the attempt given back."""

    def release_many_soon(self, message_ids: list[int]) -> None:
        """:meth:`release_many` without waiting.

        Raises:
          StoreError: the store failed or closed.
        """

    async def defer_head(self, session_id: str, until: float) -> bool:
        """Hold the session's head until epoch ``until`` at least (a suspended
        session); False if the session has no head."""

    def after_commits(self, done: Callable[[], None]) -> None:
        """Run ``done()`` on the trio thread once every operation called
        before this one has committed. Writes nothing.

        Raises:
          StoreError: the store failed or closed.
        """

    # -- the timer and the waiting line ------------------------------------------

    async def next_due(self, after: float) -> float | None:
        """The earliest deadline to wake up for: a delayed message's (whenever
        it falls due), or a retry wait's later than epoch ``after``; None if none."""

    async def collect_due(self, after: float, now: float, limit: int) -> DueWork:
        """Promote up to ``limit`` delayed messages due at epoch ``now`` into
        their queues (they get a seq now: the back of the queue), and list
        the sessions whose head's retry wait ended in ``(after, now]``."""

    async def sessions_with_work(
        self, limit: int, exclude: frozenset[str]
    ) -> list[tuple[str, int]]:
        """Up to ``limit`` sessions with queued work, not in ``exclude``, and
        their head's seq, oldest head first."""

    async def oldest_due(self, now: float) -> float | None:
        """The send time of the oldest message that is due (pending, its wait
        passed at ``now``) or in flight; None if there is none. Reads every
        queued message (System.health only)."""

    # -- operators' changes ---------------------------------------------------------

    async def retry_dead(self, message_id: int | None) -> Sent:
        """Requeue one dead letter (or all, for None) with fresh attempts, at
        the back of their sessions' queues; returns their (session, new seq)."""

    async def abort(self, message_id: int, unstarted: bool = False) -> Aborted | None:
        """Delete a pending or dead message (and forget its idempotency key).

        None if there is no such message. One a handler runs is not deleted
        (``Aborted.state`` is IN_FLIGHT). ``unstarted``: it was claimed on
        delivery and taken back from its actor before it ran: it is deleted,
        and reported as pending.
        """

    async def purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Purged:
        """Delete up to ``limit`` messages that are not in flight, oldest id first.

        Pending (delayed and retry-waiting included) and dead ones, or only
        dead ones with ``dead_only``; only ``session_id``'s if given; only
        those sent before epoch ``before`` if given. Their idempotency keys
        are forgotten. Fewer than ``limit`` deleted means none is left.
        """

    async def sweep_keys(self, before: float, limit: int) -> int:
        """Forget up to ``limit`` idempotency keys whose message was processed
        before epoch ``before``; returns how many."""

    def dead_letters(self, session_id: str | None, limit: int | None) -> list[DeadLetter]:
        """Dead letters, oldest first (only ``session_id``'s if given), as
        committed: a synchronous read that never waits for, nor blocks, the
        writer. Works after the store closed too.

        Raises:
          StoreError: the database cannot be read.
        """

    # -- heartbeat and control table --------------------------------------------------

    async def heartbeat(self, value: str) -> None:
        """Write the running system's heartbeat (JSON), for ``actors health``."""

    def heartbeat_soon(self, value: str) -> None:
        """:meth:`heartbeat` without waiting: no heartbeat called later can
        commit before it.

        Raises:
          StoreError: the store failed or closed.
        """

    def has_open_requests(self) -> bool:
        """Whether a control request waits (a synchronous read that never
        blocks the writer and writes nothing).

        Raises:
          StoreError: the database cannot be read (the store is not failed).
        """

    async def take_control(self, limit: int) -> list[ControlRequest]:
        """The open control requests, oldest first, marked taken: a command
        line that gave up waiting can withdraw only a request nobody took. A
        request taken by a system that then died is taken again by the next."""

    async def finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None:
        """Write a control request's outcome (JSON); forget the requests
        finished before epoch ``forget_before``."""


class StoreViews(Protocol):
    """Read-only views of a database for the command line, from any process.

    Reads never block a running system's writer, nor wait for it (the
    database is in WAL mode), and write nothing. The reads inside one
    ``with views.snapshot():`` see one committed state. Every read raises
    StoreError if the database cannot be read.
    """

    @property
    def path(self) -> str:
        """Where the database is."""

    def snapshot(self) -> AbstractContextManager[None]:
        """One read transaction: every read inside sees the same committed state."""

    def schema_version(self) -> int:
        """The database's schema version."""

    def heartbeat(self) -> str | None:
        """The last heartbeat a running system wrote (JSON), if any."""

    def membership(self) -> Membership | None:
        """The processes sharing the database, or None if it is not shared.

        None for a database one process owns (SQLite: whether a system runs
        is its lock file's to say); a cluster's members say it themselves,
        by their leases.
        """

    def counts(self, now: float) -> MessageCounts:
        """Messages by state; delays and retry waits judged at epoch ``now``."""

    def claimed(self) -> Claimed:
        """Tell the claimed messages whose handler started from those merely handed.

        By the start table, as recovery would: call it inside the snapshot,
        after a first read, so that the marks are at least as new as the
        snapshot (a message that started since may count as started a moment
        early, never the reverse). Without a start table of this database,
        every claimed message counts as started.
        """

    def session_count(self, session_id: str | None = None) -> int:
        """How many sessions have messages (0 or 1 with ``session_id``)."""

    def sessions(
        self, limit: int, handed_ids: list[int], session_id: str | None = None
    ) -> list[SessionCounts]:
        """Sessions with messages, deepest queue first (then most dead, then
        by id), at most ``limit``; only ``session_id`` if given. The attempts
        of ``handed_ids`` (see :meth:`claimed`) count one less."""

    def attempts_used(self, handed_ids: list[int]) -> dict[int, int]:
        """Pending or claimed messages by attempts used (at least one), the
        claims of ``handed_ids`` not counted."""

    def in_flight(self, handed_ids: list[int], limit: int) -> list[InFlight]:
        """Claimed messages not in ``handed_ids`` (their handler started), by id."""

    def open_requests(self) -> int:
        """Control requests waiting for the running system."""

    def oldest_due(self, now: float) -> float | None:
        """As :meth:`Store.oldest_due`."""

    def dead_letters(
        self, session_id: str | None = None, limit: int | None = None
    ) -> list[DeadLetter]:
        """As :meth:`Store.dead_letters`."""

    def dead_count(self, session_id: str | None = None) -> int:
        """How many dead letters there are (only ``session_id``'s if given)."""

    def unfinished_ids(self) -> set[int]:
        """The ids of every pending or claimed message."""

    def close(self) -> None:
        """Close the views' connection."""


class ControlRequests(Protocol):
    """The command line's side of the control table, from another process.

    Each call commits on its own before it returns.
    """

    def submit(self, command: str, args: str, at: float) -> int:
        """Ask the running system to apply ``command`` (``args``: a JSON
        object), requested at epoch ``at``; returns the request's id."""

    def answer(self, request_id: int) -> str | None:
        """The request's outcome (JSON) once the system wrote it, else None."""

    def withdraw(self, request_id: int) -> bool:
        """Delete the request if no system has taken it; True if it was deleted."""

    def close(self) -> None:
        """Close the connection."""
