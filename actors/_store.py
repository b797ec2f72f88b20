"""The store: the database, all of its SQL, and the task that commits it.

Trio tasks submit operations (append a batch, claim the next message, record
a failure, ...); one committer task takes every operation queued by then and
runs them all in one transaction (group commit), so one commit, and with
``durability="full"`` one fsync, serves many messages from many tasks.

Where a transaction runs (measured, see docs/performance.md):

- With ``durability="normal"``, on the trio thread, once the loop has
  nothing else to run (trio's ``wait_all_tasks_blocked``), or after
  ``IDLE_WAIT`` if it never gets there. A transaction of a hundred messages
  is a few hundred microseconds of SQLite's own work. A writer thread would
  pay for the GIL instead: each SQLite call releases it, and getting it back
  from a busy loop takes until the loop blocks (or 5 ms), so the thread's
  work did not overlap the loop's anyway, and added hand-offs to it.
- With ``durability="full"``, the same, except the COMMIT: it runs in a
  thread of its own (``_SyncThread``), so that the loop runs while the
  fsync waits on the disk.
- WAL checkpoints are out of the COMMIT (``_on_wal``): the bulk in a thread
  of their own beside the commits (``_checkpointer.py``), then a short one
  between two transactions.
- Whatever may wait goes to a worker thread: opening and recovery, that
  short checkpoint, closing, and a group that finds the database locked by
  another connection (it then waits up to ``busy_timeout`` there, not on
  the loop).

The connection is used by one of them at a time: the committer waits for
the other thread before it runs the next group.

Hot statements are set-based: a batch is inserted by multi-row ``VALUES``
statements, a box of acks deleted by one statement over a JSON array, and
the pending check of a batch's sessions is one query, so a transaction is a
handful of SQLite calls, not a few per message.

Rows live in one table. A message is *pending* (``state`` 0), *in flight*
(1) or *dead* (2); processed messages are deleted, so nothing piles up.
``seq`` is the message's place in its session's queue; it is NULL while a
delayed message waits for its time, and a new ``seq`` is drawn when the
delay ends or a dead letter is retried, so the session's order is the order
in which messages entered its queue. Ids and seqs come from one counter that
is never reused, even after the newest rows are deleted.

Every operation here runs in the committer's transaction and must be safe
to run twice: if a group transaction fails, it is rolled back and each of its
operations runs again alone, so that one failure does not fail the others.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence, Set
from typing import Any, Literal

import apsw
import attrs
import trio

from . import _clock
from ._checkpointer import Checkpointer
from ._codec import decode_body
from ._codec import encode_json as _json_array
from ._errors import SchemaVersionError, StoreError
from ._records import DeadLetter, Message, new_message
from ._starts import StartTable, database_identity, read_marks, starts_file
from ._wake import WOKEN

log = logging.getLogger("actors.store")

SCHEMA_VERSION = 2

# The longest a transaction waits for the loop to have nothing else to run.
IDLE_WAIT = 0.002


def _idle_waiter() -> Callable[[], Awaitable[None]]:
    """``trio.testing.wait_all_tasks_blocked``, without importing trio.testing.

    (trio.testing imports pytest: 70 ms, and pytest in every program that
    runs actors.) trio.testing only re-exports the function of trio's core;
    the fallback keeps working should a later trio move it.
    """
    try:
        from trio._core import wait_all_tasks_blocked  # type: ignore[attr-defined]

        return wait_all_tasks_blocked
    except ImportError:  # pragma: no cover - a trio that moved it
        import trio.testing

        return trio.testing.wait_all_tasks_blocked


# Room kept in a row, under SQLite's limit on a value (SQLITE_LIMIT_LENGTH,
# which bounds a whole row too), for what sits beside the largest value a
# user makes: a session id and a key (at most 1 KiB each), ids and times,
# and an error text (at most 20,000 characters, 80 KB as UTF-8).
ROW_ROOM = 1 << 17

# WAL pages after which a checkpoint starts (SQLite's autocheckpoint
# default): the bulk beside the commits (_checkpointer.py), then a short one
# between two transactions. Past WAL_LIMIT_PAGES (the bulk could not keep
# up) the committer checkpoints all of it with the commits held.
CHECKPOINT_PAGES = 1000
WAL_LIMIT_PAGES = 8 * CHECKPOINT_PAGES

PENDING, IN_FLIGHT, DEAD = 0, 1, 2

# Version 1: the queue.
_SCHEMA_V1 = (
    """
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        seq         INTEGER,
        state       INTEGER NOT NULL,
        attempts    INTEGER NOT NULL,
        body        NOT NULL,
        enqueued_at REAL NOT NULL,
        not_before  REAL,
        last_error  TEXT,
        crashed     INTEGER NOT NULL DEFAULT 0,
        alone       INTEGER NOT NULL DEFAULT 0
    )
    """,
    # A session's queue, head first. Dead letters and delayed rows stay out.
    "CREATE INDEX messages_queue ON messages (session_id, seq) WHERE state < 2 AND seq IS NOT NULL",
    # The timer: delayed messages and retries waiting for their time.
    "CREATE INDEX messages_due ON messages (not_before) WHERE not_before IS NOT NULL",
    "CREATE INDEX messages_dead ON messages (session_id, id) WHERE state = 2",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "INSERT INTO meta (key, value) VALUES ('next_seq', 1)",
)

# Version 2: durable actor state, idempotency keys, and the control table
# through which the command line asks a running system to change things.
_SCHEMA_V2 = (
    # ctx.state, committed with the ack of the message that changed it.
    "CREATE TABLE state (session_id TEXT PRIMARY KEY, value TEXT NOT NULL,"
    " updated_at REAL NOT NULL) WITHOUT ROWID",
    # send(key=...): the message a key was first sent as; done_at is set
    # when that message was processed, and the row is dropped a retention
    # window later.
    "ALTER TABLE messages ADD COLUMN key TEXT",
    "CREATE TABLE keys (session_id TEXT NOT NULL, key TEXT NOT NULL, message_id INTEGER NOT NULL,"
    " done_at REAL, PRIMARY KEY (session_id, key)) WITHOUT ROWID",
    "CREATE INDEX keys_done ON keys (done_at) WHERE done_at IS NOT NULL",
    # Requests from `actors retry/abort/purge` while a system runs: the
    # system applies them in order and writes the outcome.
    """
    CREATE TABLE control (
        id           INTEGER PRIMARY KEY,
        command      TEXT NOT NULL,
        args         TEXT NOT NULL,
        requested_at REAL NOT NULL,
        done_at      REAL,
        result       TEXT
    )
    """,
    "CREATE INDEX control_open ON control (id) WHERE done_at IS NULL",
)

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

# The latest epoch time at which a wait (a delay's or a retry's deadline,
# ``not_before``) was written, in ``meta``: see Store._bound_waits.
_NOTE_WAIT = (
    "INSERT INTO meta (key, value) VALUES ('waits_written', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)

# ``CAST(? AS TEXT)``, not a bare ``?``: SQLite (built with STAT4, as
# apsw's is) lets the value of a bare parameter compared with an indexed
# column choose the plan of a query with ORDER BY, and so prepares such a
# statement again at every run with a new value (the parser and planner,
# 4 us of a 6 us claim, measured). An expression is not probed: one plan,
# prepared once, the same index (tests/test_handoff.py checks both).
_QUEUE = (
    "SELECT id, seq, attempts, body, enqueued_at, not_before, last_error, crashed, alone, key"
    " FROM messages"
    " WHERE session_id = CAST(? AS TEXT) AND state < 2 AND seq IS NOT NULL ORDER BY seq"
)
_HEAD = _QUEUE + " LIMIT 1"
# Which sessions of a batch (a JSON array) have a message waiting in the
# database (not claimed). The terms of messages_queue's WHERE are spelled
# out, so that SQLite uses that partial index: it does not see that
# state = 0 implies state < 2, and would scan the whole table.
_PENDING_ANY = (
    "SELECT value FROM json_each(?) WHERE EXISTS (SELECT 1 FROM messages"
    " WHERE session_id = value AND state < 2 AND seq IS NOT NULL AND state = 0)"
)
_DELETE_IDS = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))"
# The fresh messages behind a claimed head, in order (see _claim_following).
_FOLLOWING = (
    "SELECT id, seq, state, attempts, body, enqueued_at, crashed, key FROM messages"
    " WHERE session_id = CAST(? AS TEXT) AND state < 2 AND seq > ? ORDER BY seq"
    " LIMIT CAST(? AS INTEGER)"
)
# The head and whether anything follows it.
_HEAD2 = _QUEUE + " LIMIT 2"


@attrs.frozen
class StoreStatistics:
    """Counters of the store since it opened."""

    transactions: int
    operations: int
    largest_group: int
    queued_operations: int
    checkpoints: int  # WAL checkpoints between transactions (short, or past the limit)
    bulk_checkpoints: int  # WAL checkpoints beside the commits (_checkpointer.py)
    wal_pages: int  # pages in the WAL after the last commit


@attrs.frozen
class Opened:
    """What the store found when it opened the database."""

    pending: int
    dead: int
    recovered: int


class Claim:
    """The answer to ``op_claim_next``.

    ``message`` is the claimed message, or None. Without a message,
    ``wait_until`` is the epoch time at which the head may be retried, or
    None when the session has no ready work; ``alone`` says the head may
    only run alone (nothing else in flight in the system) and was not
    claimed. ``dead`` lists the messages dead-lettered on the way (their
    attempts were used up, or they could not be decoded). With a message,
    ``extra`` lists the fresh messages queued right behind it that were
    claimed with it (``bulk``, in order: see _claim_following), ``seq`` is
    the seq of the last message claimed, and ``more`` says whether another
    message of the session waits behind that one.
    """

    __slots__ = (
        "alone",
        "dead",
        "extra",
        "message",
        "more",
        "sent",
        "seq",
        "state",
        "wait_until",
    )

    def __init__(
        self,
        message: Message | None,
        seq: int,
        wait_until: float | None,
        dead: tuple[int, ...],
        alone: bool = False,
    ) -> None:
        self.message = message
        self.seq = seq
        self.wait_until = wait_until
        self.dead = dead
        self.alone = alone
        # Whether another message of the session was queued behind the
        # claimed one (False: the claimer is caught up once it is handled).
        self.more = False
        # Fresh messages queued right behind it, claimed with it (op_claim_next's bulk).
        self.extra: list[Message] = []
        # Filled in by op_claim_next: the session's state (JSON) when asked
        # for, and the (session, seq) of messages the ack's outbox inserted.
        self.state: str | None = None
        self.sent: list[tuple[str, int]] | None = None


class Ack:
    """An acknowledgement that writes more than the deletion of its message.

    A plain ack is just the message id (an int); this is used when the
    handler changed ``ctx.state``, sent messages with ``ctx.send``, or the
    message has an idempotency key. Everything here commits in the same
    transaction as the deletion, or not at all (effectively-once).
    """

    __slots__ = ("at", "id", "key", "outbox", "session_id", "state")

    def __init__(
        self,
        message_id: int,
        session_id: str,
        state: str | None,
        outbox: list[tuple[str, str | bytes, float]] | None,
        key: str | None,
        at: float,
    ) -> None:
        self.at = at  # when the handler finished (epoch): state and key times
        self.id = message_id
        self.session_id = session_id
        self.state = state  # the new state's JSON, or None if unchanged
        self.outbox = outbox  # (session_id, encoded body, enqueued_at)
        self.key = key  # the message's idempotency key: mark it processed


class _Op:
    __slots__ = ("args", "done", "error", "finished", "fn", "result", "seal", "task")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        task: trio.lowlevel.Task | None,
        done: Callable[[Any], None] | None = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.task = task  # the waiting trio task, rescheduled when the group commits
        self.done = done  # or a callback, run on the trio thread with the result
        self.result: Any = None
        self.error: BaseException | None = None
        self.seal: Callable[[], tuple[Any, ...]] | None = None  # see Store.call_sealed
        # Set when its outcome was reported (Store._complete): its waiter is
        # woken once, and only an unfinished one by a failing committer.
        self.finished = False


def _reraise(exc: BaseException) -> None:
    raise exc


def _result(op: _Op) -> Any:
    """What a committed operation returned, or StoreError if it failed."""
    if op.error is not None:
        raise StoreError(f"database operation failed: {op.error}") from op.error
    return op.result


class _AckBox:
    """Acks submitted without waiting, written by one operation (``Store.ack_soon``).

    Tasks append until the operation runs and seals the box (under
    ``Store._ack_lock``: that may be in a worker thread, after a failed group);
    later acks start a new box.
    """

    __slots__ = ("acks", "sealed")

    def __init__(self, ack: int | Ack) -> None:
        self.acks: list[int | Ack] = [ack]
        self.sealed = False


_INSERT_COLUMNS = 7
_INSERT_SQL: dict[int, str] = {}
# Rows per INSERT statement: a batch is cut greedily into these, so that
# only five statements are ever prepared (and stay in apsw's cache).
_INSERT_CHUNKS = (256, 64, 16, 4, 1)


def _insert_sql(rows: int) -> str:
    sql = _INSERT_SQL.get(rows)
    if sql is None:
        sql = _INSERT_SQL[rows] = (
            "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
            " VALUES " + ",".join(["(?,?,?,?,?,?,?)"] * rows)
        )
    return sql


def _insert_rows(db: apsw.Connection, values: list[Any]) -> None:
    """Insert rows given flat, ``_INSERT_COLUMNS`` values each, a few statements in all."""
    rows = len(values) // _INSERT_COLUMNS
    at = 0
    for chunk in _INSERT_CHUNKS:
        while rows - at >= chunk:
            db.execute(
                _insert_sql(chunk),
                values[at * _INSERT_COLUMNS : (at + chunk) * _INSERT_COLUMNS],
            )
            at += chunk


class _SyncThread:
    """A thread for the COMMITs that fsync (durability "full"), so the loop runs meanwhile.

    ``await run(fn)`` runs ``fn()`` there and returns its result (or raises
    its exception). Cheaper per call than ``trio.to_thread.run_sync`` (no
    limiter, no thread cache, no context copy): measured, that cost the loop
    about 5 us per message at full durability. Not cancellable: the caller
    always learns the outcome.
    """

    def __init__(self, name: str) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], trio.lowlevel.Task, list[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @trio.lowlevel.enable_ki_protection  # (as Store._wait_for: queued, then parked)
    async def run(self, fn: Callable[[], Any]) -> Any:
        box: list[Any] = []  # [result, error]
        self._jobs.put((fn, trio.lowlevel.current_task(), box))
        await trio.lowlevel.wait_task_rescheduled(_abort_failed)
        result, error = box
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Let the thread end (after any job under way)."""
        self._jobs.put(None)

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, task, box = job
            try:
                box += (fn(), None)
            except BaseException as exc:  # handed to the waiting task
                box += (None, exc)
            try:
                self._token.run_sync_soon(trio.lowlevel.reschedule, task)
            except trio.RunFinishedError:  # pragma: no cover - the loop is gone
                return


def _abort_failed(_: object) -> trio.lowlevel.Abort:
    # An operation queued for the committer cannot be taken back: its caller
    # waits for the outcome (as if shielded) and sees any cancellation at
    # its next checkpoint.
    return trio.lowlevel.Abort.FAILED


class Store:
    """The database behind a running system. Open it with :meth:`open`."""

    def __init__(self, path: str, durability: str, busy_timeout_ms: int) -> None:
        self.path = path
        # Side files go by the resolved name, as the lock's (and SQLite's
        # -wal and -shm): a symbolic link or "x/../" reaches the same ones.
        self.starts_path = starts_file(path)
        self.starts: StartTable | None = None  # created once the database is open
        # (device, inode) of the file opened; check_file() compares the path's with it.
        self.identity: tuple[int, int] | None = None
        self._durability = durability
        self._busy_ms = busy_timeout_ms
        # Operations waiting for the committer's next transaction, in order.
        self._pending: list[_Op] = []
        # Operations whose arguments are made as their group is taken
        # (call_sealed); they run last in it. Trio thread only.
        self._sealing: list[_Op] = []
        self._work = trio.Event()  # set when _pending or _sealing gets an operation
        self._committer_done = trio.Event()
        # The COMMITs of durability "full" (their fsync) run there; open() makes it.
        self._sync_thread: _SyncThread | None = None
        self._wal_pages = 0  # pages in the WAL after the last commit (_on_wal)
        self._checkpoints = 0
        self._checkpointer: Checkpointer | None = None  # made by open()
        self._bulk_seen = 0  # the checkpointer's passes already followed up
        # Used by the committer, or by the worker thread it waits for.
        self._db: apsw.Connection | None = None
        self._next_seq = 0
        self._has_state = False  # whether any session has state (skip the lookup if not)
        # The largest value a user makes (a body, ctx.state's text) that a
        # row holds, in bytes: the connection's SQLITE_LIMIT_LENGTH (read
        # once it is open) less ROW_ROOM. A larger one would fail its
        # transaction ("string or blob too big") and stop the system: it is
        # refused before it reaches the store (Context._ack, run_system).
        self.max_value_bytes = 1_000_000_000 - ROW_ROOM
        self._reader: apsw.Connection | None = None  # trio thread only
        # Set once, by whoever sees the store fail first; later calls fail fast.
        self._failure: BaseException | None = None
        self._closed = False
        self._transactions = 0
        self._operations = 0
        self._largest_group = 0
        self._queued = 0
        self._inline = False  # run operations on the trio thread (MockClock)
        self._ack_box: _AckBox | None = None  # the open box of ack_soon()
        self._ack_lock = threading.Lock()
        # Set when an operation fails: the system watches it, so that a
        # failure nobody waits for (a submitted ack) still stops the system.
        self.failed = trio.Event()
        # The epoch time of the running system (its Clock.now, set by the
        # Timer): when a retry wait is written (see _bound_waits).
        self.clock_now: Callable[[], float] = _clock.wall_time

    # -- lifecycle ------------------------------------------------------

    @classmethod
    async def open(cls, path: str, *, durability: str, busy_timeout: float) -> tuple[Store, Opened]:
        """Open (or create) the database, migrate it and recover it.

        Recovery puts every message left in flight by a dead process back to
        pending at once. Its attempt stays counted (and it is marked crashed)
        only if its handler had started, as the start table
        (``<database>.starts``) says, or for every one when there is no
        matching table: a message that kills the process every time still
        ends in dead letters. One claimed but not started (handed, or claimed
        in bulk, still waiting in its actor's queue) gets its attempt back.

        Raises:
          StoreError: the file is not a usable database.
          SchemaVersionError: the database is from a newer version.
        """
        store = cls(path, durability, int(busy_timeout * 1000))
        if _virtual_time():
            # Virtual time: run SQLite on the loop thread, so that an
            # autojumping clock never skips ahead while a transaction runs.
            store._inline = True
            try:
                return store, store._open_db()
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"cannot open database {path!r}: {exc}") from exc
        try:
            # (Not cancellable: the thread runs to the end either way.)
            opened = await trio.to_thread.run_sync(store._open_db)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open database {path!r}: {exc}") from exc
        db = store._db
        assert db is not None
        # On the loop, a lock held by another connection must not be waited
        # for: such a group goes to a worker thread instead.
        db.set_busy_timeout(0)
        # Checkpoints leave the commit (the hook replaces autocheckpoint).
        db.set_wal_hook(store._on_wal)
        store._checkpointer = Checkpointer(path)
        if durability == "full":
            store._sync_thread = _SyncThread(f"actors-sync:{path}")
        trio.lowlevel.spawn_system_task(store._commit_loop, name=f"actors-store:{path}")
        return store, opened

    async def aclose(self) -> None:
        """Let the committer finish the queued operations, then close the database."""
        if self._closed:
            return
        self._closed = True
        if self._inline and self._db is not None:
            self._close_quietly(self._db)
            self._db = None
        elif self._db is not None:
            with trio.CancelScope(shield=True):
                self._work.set()
                if not self._committer_done.is_set():
                    await self._committer_done.wait()
                # Left over if the committer was cancelled (the run is ending).
                if self._pending or self._sealing:
                    group = self._take_group()
                    await trio.to_thread.run_sync(self._run_group_waiting, group, False)
                    self._complete(group)
                db, self._db = self._db, None
                if self._sync_thread is not None:
                    self._sync_thread.close()
                if self._checkpointer is not None:
                    await trio.to_thread.run_sync(self._checkpointer.close)
                # (Closing checkpoints the WAL: that is disk work.)
                await trio.to_thread.run_sync(self._close_quietly, db)
        if self._reader is not None:
            self._close_quietly(self._reader)
            self._reader = None
        if self.starts is not None:
            self.starts.close()
            self.starts = None

    def _close_quietly(self, db: apsw.Connection) -> None:
        # Everything acknowledged is committed by now; a failure here (the
        # checkpoint at close) loses nothing, since the WAL is replayed at
        # the next open. Say so, and go on closing.
        try:
            db.close()
        except apsw.Error as exc:
            log.warning("closing database %r failed (nothing is lost): %s", self.path, exc)

    @property
    def next_seq(self) -> int:
        """The seq the next queued message will take: a mark of "now" in queue order.

        Read on the trio thread it may lag a transaction being committed;
        the supervisor's fair rotation needs no more.
        """
        return self._next_seq

    def statistics(self) -> StoreStatistics:
        """Counters since the store opened."""
        return StoreStatistics(
            transactions=self._transactions,
            operations=self._operations,
            largest_group=self._largest_group,
            queued_operations=self._queued,
            checkpoints=self._checkpoints,
            bulk_checkpoints=self._checkpointer.finished if self._checkpointer else 0,
            wal_pages=self._wal_pages,
        )

    def check_file(self) -> None:
        """Fail the store if its database file was deleted or replaced since it opened.

        SQLite goes on writing to the file it has open, even once no name
        leads to it: ``send()`` would go on acknowledging messages that the
        next start, opening the path, would never see. The health beat calls
        this (one ``stat``); on a mismatch the store fails, so the system
        stops and ``run_system`` raises StoreError.

        Raises:
          StoreError: the path names no file, or another one, than the one opened.
        """
        if self.identity is None or self._failure is not None:
            return
        try:
            now = database_identity(self.path)
        except OSError as exc:
            problem = f"can no longer be found ({exc.strerror or exc})"
        else:
            if now == self.identity:
                return
            problem = "was replaced by another file"
        error = StoreError(
            f"the database file {self.path!r} {problem} while the system ran: what it"
            " wrote since went to a file that the next start would not open; stopping"
        )
        self._failure = error
        self.failed.set()
        raise error

    @property
    def failure(self) -> BaseException | None:
        """The first error the database raised, if it has failed."""
        return self._failure

    # -- the trio side --------------------------------------------------

    async def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        committed: Callable[[Any], None] | None = None,
    ) -> Any:
        """Run ``fn(*args)`` in the committer's next group transaction.

        Waits for the commit even if the calling task is cancelled meanwhile
        (shielded): the caller always learns what was written, and a
        cancellation is delivered at its next checkpoint. ``committed(result)``,
        if given, runs on the trio thread as the commit is reported, before
        any task waiting on that transaction resumes (the caller included).

        Raises:
          StoreError: the transaction failed, or the store failed earlier.
        """
        self._check_usable()
        if self._inline:
            self._queued += 1
            op = _Op(fn, args, None, committed)
            self._run_group([op])
            self._complete([op])
            await trio.lowlevel.cancel_shielded_checkpoint()
            return _result(op)
        return await self._wait_for(
            _Op(fn, args, trio.lowlevel.current_task(), committed), self._pending
        )

    async def call_sealed(
        self,
        fn: Callable[..., Any],
        seal: Callable[[], tuple[Any, ...]],
        *,
        committed: Callable[[Any], None] | None = None,
    ) -> Any:
        """As :meth:`call`, but the arguments are ``seal()``'s, made as late as possible.

        ``seal()`` runs on the trio thread when the committer takes the group
        that will run ``fn``, right before its transaction, and the operation
        runs last in that group: after every operation queued before the
        seal, as if it had been queued at that moment. The router seals its
        batch this way, so that every send made while the committer waited
        for the loop to be idle still joins this transaction.
        """
        self._check_usable()
        if self._inline:
            return await self.call(fn, *seal(), committed=committed)
        op = _Op(fn, (), trio.lowlevel.current_task(), committed)
        op.seal = seal
        return await self._wait_for(op, self._sealing)

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StoreError(f"the database failed earlier: {self._failure}") from self._failure
        if self._closed:
            raise StoreError("the store is closed")

    # KI-protected: an operation queued and interrupted before its task
    # parks would reschedule the task after it exited (TrioInternalError,
    # seen once in about 175 Ctrl-C). Protected, trio delivers a Ctrl-C to
    # the main task instead; this wait cannot be cancelled and ends with
    # its group.
    @trio.lowlevel.enable_ki_protection
    async def _wait_for(self, op: _Op, queue: list[_Op]) -> Any:
        """Queue ``op`` for the committer and wait, uncancellably, for its group."""
        self._queued += 1
        queue.append(op)
        self._work.set()
        await trio.lowlevel.wait_task_rescheduled(_abort_failed)
        return _result(op)

    def submit(self, fn: Callable[..., Any], *args: Any, done: Callable[[Any], None]) -> None:
        """Queue ``fn(*args)`` without waiting; ``done(result)`` runs after the commit.

        If the operation fails, ``done`` is not called; the store is marked
        failed (``failed`` is set) and later calls raise StoreError.
        """
        self._check_usable()
        op = _Op(fn, args, None, done)
        self._queued += 1
        if self._inline:
            self._run_group([op])
            self._complete([op])
        else:
            self._pending.append(op)
            self._work.set()

    def ack_soon(self, ack: int | Ack, done: Callable[[tuple[int, Any]], None]) -> None:
        """Queue an ack without waiting; acks queued close together share one operation.

        ``done((count, sent))`` runs after the commit, once per operation:
        ``count`` acks, and the (session, seq) of the messages their outboxes
        inserted (or None). An ack joins the open box, which sits in the
        queue where its first ack was queued, so it may commit before
        operations queued after that one but before it: never before an
        operation the acking actor queued earlier, which is what order per
        session needs. (The box is sealed when its operation runs, under
        ``_ack_lock``: that may be in a worker thread.)
        """
        box = self._ack_box
        if box is not None:
            with self._ack_lock:
                if not box.sealed:
                    box.acks.append(ack)
                    return
        box = self._ack_box = _AckBox(ack)
        self.submit(self.op_ack_box, box, done=done)

    def _complete(self, ops: list[_Op]) -> None:
        """Report each operation's outcome: its callback, then its waiter.

        Runs on the trio thread, once per group, after its transaction.
        Never raises (but for a KeyboardInterrupt on the inline path, which
        is the caller's). A callback that raises (a bug) fails the store, as
        a failed operation does, and its caller gets StoreError: the system
        stops, and says why.
        """
        reschedule = trio.lowlevel.reschedule
        for op in ops:
            op.finished = True
            self._queued -= 1
            if op.error is None and op.done is not None:
                try:
                    op.done(op.result)
                except Exception as exc:
                    error = StoreError(
                        f"the completion of a committed operation ({_name(op.fn)}) failed: {exc!r}"
                    )
                    error.__cause__ = exc
                    op.error = error
            if op.error is not None and self._failure is None:
                self._failure = op.error
                self.failed.set()
            if op.task is not None:
                task, op.task = op.task, None
                reschedule(task, WOKEN)

    def _fail_everything(self, exc: BaseException, group: list[_Op]) -> None:
        """The committer itself failed: fail the store, and every operation waiting for it.

        Runs on the trio thread, with no worker thread using the connection
        (the committer awaits them). Every queued operation, and whatever of
        ``group`` was not reported yet, gets a StoreError (their callbacks do
        not run); later calls fail fast; ``failed`` stops the system.
        """
        if isinstance(exc, StoreError):
            error = exc
        else:
            error = StoreError(f"the store's committer failed: {exc!r}")
            error.__cause__ = exc
        log.error("the store's committer failed; failing every waiting operation", exc_info=exc)
        if self._failure is None:
            self._failure = error
        ops = [*group, *self._pending, *self._sealing]
        self._pending, self._sealing = [], []
        self._ack_box = None  # (acks joining it now would wait for nothing)
        db = self._db
        if db is not None:
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except apsw.Error as rollback_error:  # closing ends it anyway
                log.warning("rolling back after the committer failed: %s", rollback_error)
        # (Not through _complete: nothing here may raise, and no callback runs.)
        for op in ops:
            if not op.finished:
                op.finished = True
                op.error = error
                self._queued -= 1
                if op.task is not None:
                    task, op.task = op.task, None
                    trio.lowlevel.reschedule(task, WOKEN)
        self.failed.set()

    # -- the committer ----------------------------------------------------

    async def _commit_loop(self) -> None:
        """Run the queued operations, a group transaction at a time, until closed.

        A system task: it must not raise (trio would crash the run, and the
        tasks waiting for a commit would never wake). A group that fails
        marks the store failed (``_complete``), and the system stops on that;
        anything else that escapes (a bug, an error SQLite was not expected
        to raise there) fails the store and every waiting operation with
        StoreError (``_fail_everything``), and the committer ends.
        """
        wait_idle = _idle_waiter()
        group: list[_Op] = []
        try:
            while True:
                if not self._pending and not self._sealing:
                    if self._closed:
                        return
                    self._work = trio.Event()
                    await self._work.wait()
                    continue
                # Let the loop run what it has first: whatever it queues
                # meanwhile joins this transaction, and SQLite never keeps a
                # runnable task waiting for long.
                with trio.move_on_after(IDLE_WAIT):
                    await wait_idle()
                group = self._take_group()
                await self._commit_group(group)
                self._complete(group)
                group = []  # (its operations' arguments: nothing waits here for the next)
                if self._wal_pages >= CHECKPOINT_PAGES:
                    await self._checkpoint_soon()
        except trio.Cancelled:
            # The run is ending (system tasks are cancelled last). A group
            # taken but not run goes back, for aclose (its operations are
            # safe to run twice).
            self._pending[:0] = [op for op in group if not op.finished]
            raise
        except BaseException as exc:
            self._fail_everything(exc, group)
        finally:
            self._committer_done.set()

    def _take_group(self) -> list[_Op]:
        """Everything queued, the sealed operations last (their ``seal()`` runs now)."""
        group, self._pending = self._pending, []
        if self._sealing:
            for op in self._sealing:
                seal, op.seal = op.seal, None
                assert seal is not None
                try:
                    op.args = seal()
                except Exception as exc:  # a bug: fail the operation, not the committer
                    op.fn, op.args = _reraise, (exc,)
            group += self._sealing
            self._sealing = []
        return group

    async def _commit_group(self, group: list[_Op]) -> None:
        """Run ``group`` in one transaction: on the loop, except what may wait.

        The statements run on the trio thread; the COMMIT too, unless it
        syncs (durability "full"). A worker thread takes the group when
        another connection holds the write lock (it waits for it there), and
        the operations of a group that failed (each alone, as _run_group).
        """
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            await trio.to_thread.run_sync(self._run_group_waiting, group, False)
            return
        except Exception as exc:
            # Not BUSY: the database could not be read (an I/O error,
            # corruption, no memory, the WAL index). Nothing ran; the group
            # fails as one whose transaction failed (each alone, then).
            self._count_group(group)
            if self._group_failed(group, exc):
                await trio.to_thread.run_sync(self._run_group_waiting, group, True)
            return
        self._count_group(group)
        try:
            self._apply(group)
            if self._sync_thread is not None:
                await self._sync_thread.run(self._commit)
            else:
                self._commit()
        except Exception as exc:  # (rolled back)
            if self._group_failed(group, exc):
                await trio.to_thread.run_sync(self._run_group_waiting, group, True)

    def _run_group_waiting(self, group: list[_Op], isolate: bool) -> None:
        """In a worker thread: ``_run_group`` (or ``_isolate``), waiting for a lock if need be."""
        db = self._db
        assert db is not None
        db.set_busy_timeout(self._busy_ms)
        try:
            if isolate:
                self._isolate(group)
            else:
                self._run_group(group)
        finally:
            db.set_busy_timeout(0)

    async def _checkpoint_soon(self) -> None:
        """The WAL is past CHECKPOINT_PAGES: start the bulk, or finish after it.

        The short checkpoint between transactions (in a worker thread, the
        commits held) copies what the bulk did not: the frames committed
        while it ran. Then nothing is left, and the next commit rewinds the
        WAL. Past WAL_LIMIT_PAGES it copies everything, as a last resort.
        """
        ck = self._checkpointer
        assert ck is not None
        if ck.finished > self._bulk_seen or self._wal_pages >= WAL_LIMIT_PAGES:
            self._bulk_seen = ck.finished
            self._wal_pages = 0
            await trio.to_thread.run_sync(self._checkpoint)
        else:
            ck.request()

    def _on_wal(self, db: apsw.Connection, name: str, pages: int) -> int:
        # SQLite's WAL hook, after each commit: note the size; the committer
        # then asks for a checkpoint (not inside the commit, on the loop).
        self._wal_pages = pages
        return apsw.SQLITE_OK

    def _checkpoint(self) -> None:
        db = self._db
        assert db is not None
        try:
            db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except apsw.Error as exc:  # nothing is lost: the WAL stays, and is retried
            log.warning("a WAL checkpoint of %r failed: %s", self.path, exc)
        else:
            self._checkpoints += 1

    def _count_group(self, group: list[_Op]) -> None:
        self._operations += len(group)
        self._largest_group = max(self._largest_group, len(group))

    def _run_group(self, group: list[_Op]) -> None:
        self._count_group(group)
        try:
            self._transaction(group)
        except Exception as exc:
            if self._group_failed(group, exc):
                self._isolate(group)

    def _group_failed(self, group: list[_Op], exc: Exception) -> bool:
        """A group's transaction failed (rolled back): True if its operations must run alone.

        An operation alone gets the error; several are isolated (_isolate)
        so that one failure does not fail the others.
        """
        if len(group) == 1:
            group[0].error = exc
            return False
        log.warning(
            "a group of %d operations failed (%s); running them one at a time", len(group), exc
        )
        return True

    def _isolate(self, group: list[_Op]) -> None:
        """Run each operation of a failed group alone: one must not fail its neighbours."""
        for op in group:
            try:
                self._transaction([op])
            except Exception as exc:
                op.error = exc

    def _transaction(self, ops: Sequence[_Op]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        self._apply(ops)
        self._commit()

    def _apply(self, ops: Sequence[_Op]) -> None:
        """Run ``ops`` in the open transaction; on failure roll it back and raise."""
        db = self._db
        assert db is not None
        seq_before = self._next_seq
        try:
            for op in ops:
                op.result = op.fn(*op.args)
            if self._next_seq != seq_before:
                db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (self._next_seq,))
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _commit(self) -> None:
        """Commit the open transaction; on failure roll it back and raise."""
        db = self._db
        assert db is not None
        try:
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._transactions += 1

    def _open_db(self) -> Opened:
        db: apsw.Connection | None = None
        try:
            db = apsw.Connection(self.path)
            opened = self._prepare(db)
        except BaseException as exc:
            if db is not None:
                self._close_quietly(db)  # a refused file must not stay open
            if isinstance(exc, apsw.NotADBError):
                raise StoreError(f"{self.path!r} is not an SQLite database: {exc}") from exc
            if isinstance(exc, apsw.Error) and not isinstance(exc, StoreError):
                raise StoreError(f"cannot open database {self.path!r}: {exc}") from exc
            raise
        self._db = db
        return opened

    def _prepare(self, db: apsw.Connection) -> Opened:
        """Check, migrate and recover a freshly opened connection."""
        db.set_busy_timeout(self._busy_ms)
        self.max_value_bytes = db.limit(apsw.SQLITE_LIMIT_LENGTH, -1) - ROW_ROOM
        version = _one(db, "PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database {self.path!r} has schema version {version}, newer than this "
                f"version of actors understands ({SCHEMA_VERSION}); upgrade actors"
            )
        if version == 0 and _one(db, "SELECT count(*) FROM sqlite_master"):
            raise StoreError(
                f"{self.path!r} is an SQLite database of another application "
                "(it has tables, but no actors schema); refusing to change it"
            )
        identity = self.identity = database_identity(self.path)
        marks = read_marks(self.starts_path, identity)
        mode = _one(db, "PRAGMA journal_mode = WAL")
        if mode != "wal":
            raise StoreError(f"cannot use WAL journal mode on {self.path!r} (got {mode!r})")
        _one(db, f"PRAGMA synchronous = {'FULL' if self._durability == 'full' else 'NORMAL'}")
        with db:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                if version:
                    log.info("migrating %r to schema version %d", self.path, target)
                for statement in _MIGRATIONS[target]:
                    db.execute(statement)
            if version != SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            recovered = self._recover(db, marks)
            # The last system's heartbeat speaks for it, not for this one
            # (it may say "stopping"): until this one beats, it has none.
            db.execute("DELETE FROM meta WHERE key = 'heartbeat'")
            self._bound_waits(db, _clock.wall_time())
        stored = _one(db, "SELECT value FROM meta WHERE key = 'next_seq'")
        top = _one(db, "SELECT max(coalesce(max(id), 0), coalesce(max(seq), 0)) FROM messages")
        self._next_seq = max(int(stored), int(top) + 1)
        self._has_state = bool(_one(db, "SELECT EXISTS (SELECT 1 FROM state)"))
        try:
            self.starts = StartTable(self.starts_path, identity)
        except OSError as exc:
            raise StoreError(f"cannot create {self.starts_path!r}: {exc}") from exc
        pending = _one(db, "SELECT count(*) FROM messages WHERE state < 2")
        dead = _one(db, "SELECT count(*) FROM messages WHERE state = 2")
        return Opened(pending=pending, dead=dead, recovered=recovered)

    def _recover(self, db: apsw.Connection, marks: list[int] | None) -> int:
        """The process died: put whatever was in flight back to pending at once.

        A message whose handler had started keeps its attempt counted (the
        outcome is unknown) and is marked crashed: see op_claim_next for how
        the blame is settled. One claimed but still waiting in its actor's
        queue gets its attempt back. The start table (``marks``, see
        _starts.py) says which: per session, every claimed message up to the
        last one whose handler started. Without it (no file, or not this
        database's), every claimed message counts as started.
        """
        if marks is None:
            db.execute("UPDATE messages SET state = 0, crashed = 1 WHERE state = 1")
            started, waiting = db.changes(), 0
        else:
            started = 0
            for message_id in marks:
                row = db.execute(
                    "SELECT session_id, seq FROM messages WHERE id = ? AND state = 1",
                    (message_id,),
                ).fetchone()
                if row is not None:
                    db.execute(
                        "UPDATE messages SET state = 0, crashed = 1"
                        " WHERE session_id = ? AND state = 1 AND seq <= ?",
                        row,
                    )
                    started += db.changes()
            db.execute(
                "UPDATE messages SET state = 0, attempts = max(attempts - 1, 0) WHERE state = 1"
            )
            waiting = db.changes()
        if started or waiting:
            log.warning(
                "%d message(s) were in flight when the last process died; back to pending"
                " (%d had not started: their attempt is given back)",
                started + waiting,
                waiting,
            )
        return started + waiting

    def _bound_waits(self, db: apsw.Connection, now: float) -> int:
        """The wall clock went back since the waits were written: bound each one
        by what it was then. Returns how many deadlines moved.

        Every wait (``not_before``) was written at or before the time kept in
        ``meta`` as ``waits_written``; a wait written at ``w`` for ``d``
        seconds has ``not_before = w + d <= waits_written + d``. If ``now`` is
        earlier than ``waits_written``, the clock went back (at least that
        far): every deadline moves back by the difference, so that each wait
        is at most what was left of it at ``waits_written`` (its ``d`` or
        less), whatever the jump. (As if the clock had stopped while the
        system was down.) A clock that went forward ends waits early; that
        is not caught: nothing can tell it from time that passed.
        """
        written = _one(db, "SELECT value FROM meta WHERE key = 'waits_written'")
        if written is None or float(written) <= now:
            return 0
        back = float(written) - now
        db.execute(
            "UPDATE messages SET not_before = not_before - ? WHERE not_before IS NOT NULL",
            (back,),
        )
        moved = db.changes()
        db.execute("UPDATE meta SET value = ? WHERE key = 'waits_written'", (now,))
        log.warning(
            "the clock is %.3f s behind the time the last waits were written; %d delay or"
            " retry deadline(s) moved back as much, so that none waits longer than it was",
            back,
            moved,
        )
        return moved

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- operations (in the committer's transaction) ---------------------
    # Each returns plain data; none raises for an ordinary outcome.

    def op_append(
        self,
        sessions: Sequence[str],
        bodies: Sequence[str | bytes],
        enqueued: Sequence[float],
        not_before: Sequence[float | None] | None,
        claimed: Set[int] = frozenset(),
        keys: Sequence[str | None] | None = None,
        key_retention: float = 0.0,
    ) -> tuple[int, dict[int, int] | None]:
        """Insert a batch in order; returns the first id and the duplicates.

        Ids are ``first + index``. Rows at the indices in ``claimed`` are
        inserted already claimed (in flight, attempt 1): each goes straight
        to its session's actor (claim on delivery, see Router), so its claim
        is durable in the same transaction as the message itself. Only if
        nothing of that session is pending, though: a claimed message must
        never overtake one that waits in the database. ``claimed`` is then a
        mutable set, and the indices of such sessions are removed from it
        (they are inserted pending; the actor claims them in order).

        With ``keys``, an item whose (session, key) was sent before, and
        whose message is still pending, in flight or dead, or was processed
        less than ``key_retention`` seconds ago, is not inserted: the
        returned dict maps its index to the first message's id (None when
        there is no duplicate).
        """
        db = self._db
        assert db is not None
        first = self._next_seq
        self._next_seq += len(sessions)
        if not_before is not None and enqueued:
            db.execute(_NOTE_WAIT, (max(enqueued),))  # (the delays' writing time: see _bound_waits)
        if keys is not None:
            return first, self._append_keyed(
                first, sessions, bodies, enqueued, not_before, keys, key_retention
            )
        if claimed:
            self._drop_overtaking(sessions, claimed)
        if not_before is None:
            # (id, session_id, seq, state, attempts, body, enqueued_at), flat:
            # claimed rows are in flight with their first attempt counted.
            values: list[Any] = []
            if claimed:
                for i, (s, b, t) in enumerate(zip(sessions, bodies, enqueued, strict=True)):
                    c = 1 if i in claimed else 0
                    values += (first + i, s, first + i, c, c, b, t)
            else:
                for i, (s, b, t) in enumerate(zip(sessions, bodies, enqueued, strict=True)):
                    values += (first + i, s, first + i, 0, 0, b, t)
            _insert_rows(db, values)
        else:
            db.executemany(
                "INSERT INTO messages"
                " (id, session_id, seq, state, attempts, body, enqueued_at, not_before)"
                " VALUES (?, ?, ?, 0, 0, ?, ?, ?)",
                (
                    (first + i, s, None if d is not None else first + i, b, t, d)
                    for i, (s, b, t, d) in enumerate(
                        zip(sessions, bodies, enqueued, not_before, strict=True)
                    )
                ),
            )
        return first, None

    def _drop_overtaking(self, sessions: Sequence[str], claimed: Set[int]) -> None:
        """Remove from ``claimed`` the indices of sessions that have pending messages."""
        assert isinstance(claimed, set), "claimed must be a mutable set to be narrowed"
        db = self._db
        assert db is not None
        wanted = list({sessions[i] for i in claimed})
        busy = {row[0] for row in db.execute(_PENDING_ANY, (_json_array(wanted),))}
        if busy:
            claimed.difference_update([i for i in claimed if sessions[i] in busy])

    def _append_keyed(
        self,
        first: int,
        sessions: Sequence[str],
        bodies: Sequence[str | bytes],
        enqueued: Sequence[float],
        not_before: Sequence[float | None] | None,
        keys: Sequence[str | None],
        key_retention: float,
    ) -> dict[int, int]:
        # A batch with keys goes row by row: each key is looked up after the
        # rows before it were inserted, so duplicates within a batch are
        # found too. (Never claimed on delivery: the router leaves them out.)
        db = self._db
        assert db is not None
        duplicates: dict[int, int] = {}
        for i, session_id in enumerate(sessions):
            key = keys[i]
            msg_id = first + i
            if key is not None:
                row = db.execute(
                    "SELECT message_id, done_at FROM keys WHERE session_id = ? AND key = ?",
                    (session_id, key),
                ).fetchone()
                if row is not None and (row[1] is None or row[1] >= enqueued[i] - key_retention):
                    duplicates[i] = int(row[0])
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO keys (session_id, key, message_id, done_at)"
                    " VALUES (?, ?, ?, NULL)",
                    (session_id, key, msg_id),
                )
            delay = not_before[i] if not_before is not None else None
            db.execute(
                "INSERT INTO messages"
                " (id, session_id, seq, state, attempts, body, enqueued_at, not_before, key)"
                " VALUES (?, ?, ?, 0, 0, ?, ?, ?, ?)",
                (
                    msg_id,
                    session_id,
                    None if delay is not None else msg_id,
                    bodies[i],
                    enqueued[i],
                    delay,
                    key,
                ),
            )
        return duplicates

    def _apply_ack(self, ack: Ack) -> list[tuple[str, int]] | None:
        """Delete the acked message, and write what its handler changed."""
        db = self._db
        assert db is not None
        now = ack.at
        db.execute("DELETE FROM messages WHERE id = ?", (ack.id,))
        if ack.state is not None:
            db.execute(
                "INSERT OR REPLACE INTO state (session_id, value, updated_at) VALUES (?, ?, ?)",
                (ack.session_id, ack.state, now),
            )
            self._has_state = True
        if ack.key is not None:
            db.execute(
                "UPDATE keys SET done_at = ? WHERE session_id = ? AND key = ? AND message_id = ?",
                (now, ack.session_id, ack.key, ack.id),
            )
        if not ack.outbox:
            return None
        sent: list[tuple[str, int]] = []
        for session_id, body, enqueued_at in ack.outbox:
            seq = self._take_seq()
            db.execute(
                "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
                " VALUES (?, ?, ?, 0, 0, ?, ?)",
                (seq, session_id, seq, body, enqueued_at),
            )
            sent.append((session_id, seq))
        return sent

    def op_load_state(self, session_id: str) -> str | None:
        """The session's state (JSON text), or None if it has none."""
        db = self._db
        assert db is not None
        if not self._has_state:
            return None
        row = db.execute("SELECT value FROM state WHERE session_id = ?", (session_id,)).fetchone()
        return None if row is None else str(row[0])

    def op_claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool = False,
        bulk: int = 0,
    ) -> Claim:
        """Ack ``ack`` (delete it), then claim the session's head message.

        With ``want_state``, the claim also carries the session's state
        (read after the ack's own write, so it is the latest). With ``bulk``,
        up to that many fresh messages queued right behind the head are
        claimed too (``Claim.extra``, see _claim_following).

        The claim counts the attempt (a delivery) durably before any handler
        runs. A head whose body cannot be decoded is dead-lettered here, and
        the next one is tried.

        Blame for a dead process: every message in flight whose handler had
        started when the process died is marked ``crashed``, its attempt
        counted (see _recover). The poison message among them cannot be
        told from its bystanders, so a crashed message whose next attempt
        is its last runs *alone* (``alone=True``: the
        supervisor holds every other handler back). A message that kills the
        process every time thus ends in dead letters after ``max_attempts``
        deaths, the last one alone, and one that merely shared crashes with
        it gets its last attempt in peace. No message is ever delivered more
        than ``max_attempts`` times: one whose last attempt ended in a crash
        it shared (its earlier attempts had failed normally) is
        dead-lettered, with a reason that says the blame is uncertain.
        """
        db = self._db
        assert db is not None
        sent = self.op_ack(ack) if ack is not None else None
        claim = self._claim(session_id, now, max_attempts, alone, bulk)
        claim.sent = sent
        if want_state:
            claim.state = self.op_load_state(session_id)
        return claim

    def _claim(
        self, session_id: str, now: float, max_attempts: int, alone: bool, bulk: int = 0
    ) -> Claim:
        db = self._db
        assert db is not None
        dead: list[int] = []
        while True:
            rows: list[Any] = db.execute(_HEAD2, (session_id,)).fetchall()
            if not rows:
                return Claim(None, 0, None, tuple(dead))
            row = rows[0]
            (
                msg_id,
                seq,
                attempts,
                raw,
                enqueued_at,
                not_before,
                last_error,
                crashed,
                ran_alone,
                key,
            ) = row
            if not_before is not None and not_before > now:
                return Claim(None, seq, not_before, tuple(dead))
            if attempts >= max_attempts:
                if crashed and ran_alone:
                    reason = (
                        f"gave up after {attempts} attempt(s); the process died during the last "
                        "one, which ran alone: this message kills the process"
                    )
                elif crashed:
                    reason = (
                        f"gave up after {attempts} attempt(s); the process died during the last "
                        "one (other messages were in flight too, so it may not be the cause)"
                    )
                else:
                    reason = (
                        f"gave up after {attempts} attempt(s); the last one ended without an "
                        "outcome"
                    )
                if last_error:
                    reason += f"; the error before that:\n{last_error}"
                db.execute(
                    "UPDATE messages SET state = 2, not_before = NULL, last_error = ? WHERE id = ?",
                    (reason, msg_id),
                )
                dead.append(msg_id)
                continue
            if crashed and attempts == max_attempts - 1 and not alone:
                return Claim(None, seq, None, tuple(dead), alone=True)
            try:
                body = decode_body(raw)
            except ValueError as exc:
                db.execute(
                    "UPDATE messages SET state = 2, not_before = NULL, last_error = ? WHERE id = ?",
                    (f"cannot decode message body: {exc}", msg_id),
                )
                dead.append(msg_id)
                continue
            db.execute(
                "UPDATE messages SET state = 1, attempts = ?, not_before = NULL, crashed = 0,"
                " alone = ? WHERE id = ?",
                (attempts + 1, 1 if alone else 0, msg_id),
            )
            message = Message(
                id=msg_id,
                session_id=session_id,
                body=body,
                attempt=attempts + 1,
                enqueued_at=enqueued_at,
                key=key,
            )
            claim = Claim(message, seq, None, tuple(dead))
            claim.more = len(rows) > 1
            if claim.more and bulk > 0:
                self._claim_following(claim, session_id, seq, bulk)
            return claim

    def _claim_following(self, claim: Claim, session_id: str, after: int, limit: int) -> None:
        """Claim up to ``limit`` fresh messages queued right behind the head just claimed.

        Honest because of the start table: a claimed message whose handler
        never started gets its attempt back after a crash. Only first
        deliveries qualify (never delivered, not crash suspects, decodable);
        the first that does not stops the run, and a later claim takes it as
        its head. Sets ``claim.extra``, ``claim.seq``
        (the last one's) and ``claim.more`` (whether more wait behind them).
        """
        db = self._db
        assert db is not None
        rows: list[Any] = db.execute(_FOLLOWING, (session_id, after, limit + 1)).fetchall()
        extra = claim.extra
        claim.more = len(rows) > limit
        for msg_id, seq, state, attempts, raw, enqueued_at, crashed, key in rows[:limit]:
            if state or attempts or crashed:
                claim.more = True
                break
            try:
                body = decode_body(raw)
            except ValueError:
                claim.more = True
                break
            claim.seq = seq
            extra.append(
                new_message(
                    id=msg_id,
                    session_id=session_id,
                    body=body,
                    attempt=1,
                    enqueued_at=enqueued_at,
                    key=key,
                )
            )
        if extra:
            db.executemany(
                "UPDATE messages SET state = 1, attempts = 1 WHERE id = ?",
                [(m.id,) for m in extra],
            )

    def op_ack(self, ack: int | Ack) -> list[tuple[str, int]] | None:
        """Delete a processed message (and write its Ack); returns the outbox's (session, seq)."""
        if type(ack) is int:
            assert self._db is not None
            self._db.execute("DELETE FROM messages WHERE id = ?", (ack,))
            return None
        assert isinstance(ack, Ack)
        return self._apply_ack(ack)

    def op_ack_box(self, box: _AckBox) -> tuple[int, list[tuple[str, int]] | None]:
        """Write a box of acks (see ack_soon); returns (count, the outboxes' (session, seq))."""
        db = self._db
        assert db is not None
        with self._ack_lock:
            box.sealed = True
            acks = box.acks
        plain = [a for a in acks if type(a) is int]
        if plain:
            db.execute(_DELETE_IDS, (_json_array(plain),))
        sent: list[tuple[str, int]] | None = None
        if len(plain) != len(acks):
            for ack in acks:
                if type(ack) is not int:
                    assert isinstance(ack, Ack)
                    more = self._apply_ack(ack)
                    if more:
                        sent = (sent or []) + more
        return len(acks), sent

    def op_sweep_keys(self, before: float, limit: int) -> int:
        """Forget idempotency keys whose message was processed before ``before``."""
        db = self._db
        assert db is not None
        db.execute(
            "DELETE FROM keys WHERE (session_id, key) IN"
            " (SELECT session_id, key FROM keys WHERE done_at < ? LIMIT ?)",
            (before, limit),
        )
        return int(db.changes())

    def op_fail(
        self, message_id: int, error: str, retry_at: float, max_attempts: int
    ) -> Literal["retry", "dead", "gone"]:
        """Record a failed attempt: back to pending until ``retry_at``, or dead."""
        db = self._db
        assert db is not None
        row = db.execute("SELECT attempts FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return "gone"
        if row[0] >= max_attempts:
            db.execute(
                "UPDATE messages SET state = 2, not_before = NULL, last_error = ?, alone = 0"
                " WHERE id = ?",
                (error, message_id),
            )
            return "dead"
        db.execute(
            "UPDATE messages SET state = 0, not_before = ?, last_error = ?, alone = 0 WHERE id = ?",
            (retry_at, error, message_id),
        )
        db.execute(_NOTE_WAIT, (self.clock_now(),))
        return "retry"

    def op_release(self, message_id: int, uncount: bool, crashed: bool) -> None:
        """Put an in-flight message back to pending, at the head of its queue.

        ``uncount`` gives the claim's attempt back: no handler started for
        it. ``crashed`` marks an attempt that ended with no outcome (a
        KeyboardInterrupt or SystemExit escaped the handler), as after a
        dead process.
        """
        assert self._db is not None
        self._db.execute(
            "UPDATE messages SET state = 0, attempts = max(attempts - ?, 0), crashed = ?"
            " WHERE id = ? AND state = 1",
            (1 if uncount else 0, 1 if crashed else 0, message_id),
        )

    def op_release_many(self, message_ids: list[int]) -> None:
        """Give back claims whose handler never started (claimed on delivery, unused)."""
        assert self._db is not None
        self._db.executemany(
            "UPDATE messages SET state = 0, attempts = max(attempts - 1, 0)"
            " WHERE id = ? AND state = 1",
            ((i,) for i in message_ids),
        )

    def op_nothing(self) -> None:
        """Write nothing: its completion says every operation before it committed."""

    def op_defer_head(self, session_id: str, until: float) -> bool:
        """Hold the session's head until ``until`` (a suspended session). False if no head."""
        db = self._db
        assert db is not None
        row = db.execute(_HEAD, (session_id,)).fetchone()
        if row is None:
            return False
        db.execute(
            "UPDATE messages SET not_before = max(coalesce(not_before, 0), ?) WHERE id = ?",
            (until, row[0]),
        )
        db.execute(_NOTE_WAIT, (self.clock_now(),))
        return True

    def op_next_due(self, after: float) -> float | None:
        """The earliest delay or retry deadline later than ``after``."""
        db = self._db
        assert db is not None
        # Delayed messages count whenever they fall due; retry waits only after ``after``.
        delayed = _one(
            db,
            "SELECT min(not_before) FROM messages"
            " WHERE not_before IS NOT NULL AND seq IS NULL AND state = 0",
        )
        retry = _one(db, "SELECT min(not_before) FROM messages WHERE not_before > ?", (after,))
        values = [v for v in (delayed, retry) if v is not None]
        return min(values) if values else None

    def op_collect_due(
        self, after: float, now: float, limit: int
    ) -> tuple[list[tuple[str, int]], list[str], bool]:
        """Deadlines that passed: promote delayed messages into their queues.

        Returns ``(promoted, retry_sessions, more)``: the (session, seq) of
        each message whose delay ended, in the order they entered their
        queues; the sessions whose head finished its retry wait in
        ``(after, now]``; and whether more delayed messages are due than
        ``limit`` allowed.
        """
        db = self._db
        assert db is not None
        due = db.execute(
            "SELECT id, session_id FROM messages WHERE not_before <= ? AND seq IS NULL"
            " AND state = 0 ORDER BY not_before, id LIMIT ?",
            (now, limit + 1),
        ).fetchall()
        more = len(due) > limit
        promoted: list[tuple[str, int]] = []
        for msg_id, session_id in due[:limit]:
            assert isinstance(session_id, str)
            seq = self._take_seq()
            db.execute("UPDATE messages SET seq = ?, not_before = NULL WHERE id = ?", (seq, msg_id))
            promoted.append((session_id, seq))
        sessions = [
            row[0]
            for row in db.execute(
                "SELECT DISTINCT session_id FROM messages WHERE not_before > ? AND not_before <= ?"
                " AND seq IS NOT NULL AND state = 0",
                (after, now),
            )
        ]
        return promoted, sessions, more

    def op_sessions_with_work(self, limit: int, exclude: frozenset[str]) -> list[tuple[str, int]]:
        """Sessions with queued work and their head's seq, oldest head first, not ``exclude``."""
        db = self._db
        assert db is not None
        rows = db.execute(
            "SELECT session_id, min(seq) AS head FROM messages"
            " WHERE state < 2 AND seq IS NOT NULL GROUP BY session_id ORDER BY head LIMIT ?",
            (limit + len(exclude),),
        )
        found = [(s, head) for s, head in rows if s not in exclude]
        return found[:limit]

    def op_retry_dead(self, message_id: int | None) -> list[tuple[str, int]]:
        """Requeue one dead letter, or all, at the back of their sessions' queues."""
        db = self._db
        assert db is not None
        if message_id is None:
            rows = db.execute("SELECT id, session_id FROM messages WHERE state = 2 ORDER BY id")
        else:
            rows = db.execute(
                "SELECT id, session_id FROM messages WHERE state = 2 AND id = ?", (message_id,)
            )
        requeued: list[tuple[str, int]] = []
        for msg_id, session_id in rows.fetchall():
            assert isinstance(session_id, str)
            seq = self._take_seq()
            db.execute(
                "UPDATE messages SET state = 0, attempts = 0, seq = ?, not_before = NULL,"
                " last_error = NULL, crashed = 0, alone = 0 WHERE id = ?",
                (seq, msg_id),
            )
            requeued.append((session_id, seq))
        return requeued

    def op_abort(self, message_id: int, unstarted: bool = False) -> tuple[int, str] | None:
        """Delete a pending or dead message; returns its former state and session.

        Returns None if there is no such message, and ``IN_FLIGHT`` (deleting
        nothing) if a handler is running it. With ``unstarted``, the message
        was claimed on delivery and taken back from its actor before it ran:
        it is deleted, and reported as pending.
        """
        db = self._db
        assert db is not None
        row = db.execute(
            "SELECT state, session_id, key FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        if row is None:
            return None
        if unstarted and row[0] == IN_FLIGHT:
            row = (PENDING, *row[1:])
        if row[0] != IN_FLIGHT:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if row[2] is not None:  # a later send with that key is new work
                db.execute(
                    "DELETE FROM keys WHERE session_id = ? AND key = ? AND message_id = ?",
                    (row[1], row[2], message_id),
                )
        return int(row[0]), str(row[1])

    def op_purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> tuple[int, int, list[int]]:
        """Delete up to ``limit`` messages that are not in flight; returns (pending, dead, ids).

        Pending (delayed and retry-waiting included) and dead messages, or
        only dead ones with ``dead_only``; only ``session_id``'s if given;
        only those sent before epoch time ``before`` if given. The keys of
        deleted keyed messages are forgotten, as in ``op_abort``.
        """
        db = self._db
        assert db is not None
        where = "state = 2" if dead_only else "state != 1"
        params: tuple[Any, ...] = ()
        if session_id is not None:
            where += " AND session_id = ?"
            params += (session_id,)
        if before is not None:
            where += " AND enqueued_at < ?"
            params += (before,)
        rows = db.execute(
            f"SELECT id, session_id, state, key FROM messages WHERE {where} ORDER BY id LIMIT ?",
            (*params, limit),
        ).fetchall()
        db.executemany("DELETE FROM messages WHERE id = ?", ((row[0],) for row in rows))
        db.executemany(
            "DELETE FROM keys WHERE session_id = ? AND key = ? AND message_id = ?",
            ((s, k, i) for i, s, _, k in rows if k is not None),
        )
        dead = sum(1 for row in rows if row[2] == DEAD)
        return len(rows) - dead, dead, [int(str(row[0])) for row in rows]

    def op_oldest_due(self, now: float) -> float | None:
        """The ``enqueued_at`` of the oldest message that is due or in flight.

        Due: pending and not waiting for a delay or a retry deadline. None
        when there is none. Reads every queued row (System.health only).
        """
        db = self._db
        assert db is not None
        oldest = _one(
            db,
            "SELECT min(enqueued_at) FROM messages WHERE state < 2 AND seq IS NOT NULL"
            " AND (not_before IS NULL OR not_before <= ?)",
            (now,),
        )
        return None if oldest is None else float(oldest)

    def op_heartbeat(self, value: str) -> None:
        """Write the running system's heartbeat (JSON) into ``meta``."""
        assert self._db is not None
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('heartbeat', ?)", (value,)
        )

    def op_take_control(self, limit: int) -> list[tuple[int, str, str]]:
        """The open control requests, oldest first: (id, command, args JSON).

        Marks them taken (``result`` = ``{"status": "applying"}``), so that
        a command line that gave up waiting can withdraw only a request
        nobody has taken. A request taken by a system that then died is
        taken again by the next one.
        """
        db = self._db
        assert db is not None
        rows = db.execute(
            "SELECT id, command, args FROM control WHERE done_at IS NULL ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        taken: list[tuple[int, str, str]] = []
        for request_id, command, args in rows:
            assert isinstance(request_id, int)
            db.execute(
                'UPDATE control SET result = \'{"status": "applying"}\' WHERE id = ?',
                (request_id,),
            )
            taken.append((request_id, str(command), str(args)))
        return taken

    def op_finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None:
        """Write a control request's outcome; forget requests done before ``forget_before``."""
        db = self._db
        assert db is not None
        db.execute(
            "UPDATE control SET done_at = ?, result = ? WHERE id = ?", (done_at, result, request_id)
        )
        db.execute("DELETE FROM control WHERE done_at < ?", (forget_before,))

    # -- reads on the trio thread ---------------------------------------

    def dead_letters(self, session_id: str | None, limit: int | None) -> list[DeadLetter]:
        """Read dead letters through a separate read connection (WAL: never blocks writers).

        Works after the store closed too, through a connection of its own.

        Raises:
          StoreError: the database cannot be read.
        """
        try:
            if self._closed:
                reader = self._connect_reader()
                try:
                    return self._read_dead_letters(reader, session_id, limit)
                finally:
                    reader.close()
            if self._reader is None:
                self._reader = self._connect_reader()
            return self._read_dead_letters(self._reader, session_id, limit)
        except apsw.Error as exc:
            raise StoreError(f"cannot read dead letters from {self.path!r}: {exc}") from exc

    def _connect_reader(self) -> apsw.Connection:
        reader = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        reader.set_busy_timeout(self._busy_ms)
        return reader

    @staticmethod
    def _read_dead_letters(
        reader: apsw.Connection, session_id: str | None, limit: int | None
    ) -> list[DeadLetter]:
        sql = (
            "SELECT id, session_id, body, attempts, last_error, enqueued_at FROM messages"
            " WHERE state = 2"
        )
        params: tuple[Any, ...] = ()
        if session_id is not None:
            sql += " AND session_id = ?"
            params = (session_id,)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        out = []
        for msg_id, session, raw, attempts, last_error, enqueued_at in reader.execute(sql, params):
            try:
                body = decode_body(raw)
            except ValueError:
                body = raw
            out.append(
                DeadLetter(
                    id=msg_id,
                    session_id=session,
                    body=body,
                    attempts=attempts,
                    last_error=last_error or "",
                    enqueued_at=enqueued_at,
                )
            )
        return out


def _virtual_time() -> bool:
    """Whether trio runs on trio.testing.MockClock (without importing trio.testing,
    which would pull pytest into every program that imports actors)."""
    testing = sys.modules.get("trio.testing")
    return testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _one(db: apsw.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row (consuming the cursor fully)."""
    rows = db.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


def database_path(path: str | os.PathLike[str]) -> str:
    """Normalise a user's path argument; reject what cannot be a durable file."""
    if isinstance(path, bytes) or not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not text or text == ":memory:" or text.startswith("file:"):
        raise ValueError(f"path must name a database file, got {text!r}")
    # Refused here, before any file is created: SQLite takes a file name as
    # UTF-8 (a lone surrogate, as os.fsdecode makes of a non-UTF-8 byte,
    # cannot be opened: the lock file would be made, then the open fail),
    # and the OS takes neither a NUL nor a name its encoding cannot write.
    try:
        text.encode("utf-8")
        os.fsencode(text)
        if "\0" in text:
            raise ValueError
    except (UnicodeError, ValueError):
        raise ValueError(
            f"path {text!r} is not a file name SQLite can open (not valid UTF-8, or a NUL)"
        ) from None
    # "dir/" (or "dir/.") would be made a file named "dir" below; an
    # existing directory is no database: a mistake to say so about, not to
    # act on.
    if os.path.basename(text) in ("", ".", ".."):
        raise ValueError(f"path must name a database file, not a directory: {text!r}")
    # Absolute, so that a later chdir changes nothing; "." and empty parts
    # dropped, but ".." kept: after a symbolic link, "link/.." is the parent
    # of the link's target, not the directory the link is in, and
    # os.path.abspath (which drops "x/.." as text) would name another file
    # than the one the system opens. The lock and the side files go by the
    # fully resolved path (_lock.real_path); this is the name the system
    # checks its file by (Store.check_file) and shows in messages.
    absolute = text if os.path.isabs(text) else os.path.join(os.getcwd(), text)
    normal = os.sep + os.sep.join(p for p in absolute.split(os.sep) if p not in ("", "."))
    if os.path.isdir(normal):
        raise ValueError(f"path must name a database file, but {text!r} is a directory")
    return normal
