"""Group commit: one task runs every queued operation in one transaction.

Trio tasks queue *operations*, callables that the committer does not look
into (a backend's statements, bound to its connection); the committer takes
every operation queued by then and runs them all in one transaction, so one
commit, and with an fsync one sync, serves many messages from many tasks.
It knows of the database only what :class:`Transactions` says: begin,
commit, roll back, wait for another connection's lock or not, and the
backend's maintenance between two transactions.

Where a transaction runs (the measurements are in docs/performance.md):

- On the trio thread, once the loop has nothing else to run (trio's
  ``wait_all_tasks_blocked``), or after ``IDLE_WAIT`` if it never gets
  there. A transaction of a hundred messages is a few hundred microseconds
  of SQLite's own work. A writer thread would pay for the GIL instead: each
  SQLite call releases it, and getting it back from a busy loop takes until
  the loop blocks (or 5 ms), so the thread's work did not overlap the
  loop's anyway, and added hand-offs to it.
- With ``sync_commits``, the same, except the COMMIT: it runs in a thread
  of its own (``SyncThread``), so that the loop runs while the fsync waits
  on the disk.
- Whatever may wait goes to a worker thread: a group that finds the
  database locked by another connection (it then waits for the lock there,
  not on the loop), the operations of a failed group run one by one, and
  the backend's maintenance if it says so.
- ``inline`` (under trio's MockClock): each operation at once, alone in its
  transaction, on the trio thread, so that an autojumping clock never skips
  ahead while a transaction runs.

The connection is used by one of them at a time: the committer waits for
the other thread before it runs the next group.

Every operation must be safe to run twice: if a group transaction fails, it
is rolled back and each of its operations runs again alone, so that one
failure does not fail the others.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, TypeVarTuple

import attrs
import trio

from .._wake import WOKEN
from .errors import StoreError

log = logging.getLogger("actors.store")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# The longest a transaction waits for the loop to have nothing else to run.
IDLE_WAIT = 0.002


class Transactions(Protocol):
    """What the committer needs of a backend's connection.

    The committer calls these from one thread at a time, the trio thread or
    a worker thread it waits for.
    """

    def try_begin(self) -> bool:
        """Begin a write transaction, or return False at once if another
        connection holds the write lock. Raises if the database fails."""

    def begin(self) -> None:
        """Begin a write transaction, waiting for a lock as ``wait_for_locks`` allows."""

    def finish(self) -> None:
        """In the transaction, after its operations: write what they kept in memory."""

    def commit(self) -> None:
        """Commit; on failure roll back and raise."""

    def rollback(self) -> None:
        """Roll back the open transaction, if there is one."""

    def wait_for_locks(self, wait: bool) -> None:
        """Whether ``begin`` waits for another connection's lock (a worker
        thread) or not (the trio thread)."""

    def reconnect(self, exc: Exception, attempt: int) -> bool:
        """A transaction failed with ``exc``: if the connection was lost (or the
        server asks for a retry), wait a moment, reconnect, and return True:
        the committer runs the same operations again in a new transaction.
        False: ``exc`` is the operations' failure. Blocking; never on the
        trio thread but inline."""

    def maintenance_due(self) -> bool:
        """Whether :meth:`maintain` should run before the next transaction."""

    async def maintain(self) -> None:
        """Between two transactions, with the connection to itself (a checkpoint)."""


@attrs.frozen
class CommitterStatistics:
    """Counters of the committer since it started."""

    transactions: int
    operations: int
    largest_group: int
    queued_operations: int


def idle_waiter() -> Callable[[], Awaitable[None]]:
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


def virtual_time() -> bool:
    """Whether trio runs on trio.testing.MockClock (without importing trio.testing,
    which would pull pytest into every program that imports actors)."""
    testing = sys.modules.get("trio.testing")
    return testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)


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
        self.seal: Callable[[], tuple[Any, ...]] | None = None  # see Committer.call_sealed
        # Set when its outcome was reported (Committer._complete): its waiter
        # is woken once, and only an unfinished one by a failing committer.
        self.finished = False


def _reraise(exc: BaseException) -> None:
    raise exc


def _result(op: _Op) -> Any:
    """What a committed operation returned, or StoreError if it failed."""
    if op.error is not None:
        raise StoreError(f"database operation failed: {op.error}") from op.error
    return op.result


def _abort_failed(_: object) -> trio.lowlevel.Abort:
    # An operation queued for the committer cannot be taken back: its caller
    # waits for the outcome (as if shielded) and sees any cancellation at
    # its next checkpoint.
    return trio.lowlevel.Abort.FAILED


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class SyncThread:
    """A thread for the COMMITs that fsync, so the loop runs meanwhile.

    ``await run(fn)`` runs ``fn()`` there and returns its result (or raises
    its exception). Cheaper per call than ``trio.to_thread.run_sync`` (no
    limiter, no thread cache, no context copy), which the loop would pay
    per commit at full durability. Not cancellable: the caller
    always learns the outcome.
    """

    def __init__(self, name: str) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], trio.lowlevel.Task, list[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @trio.lowlevel.enable_ki_protection  # (as Committer._wait_for: queued, then parked)
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


class Committer:
    """Runs operations in group transactions on one connection (see the module).

    Create it on the trio thread, then :meth:`start` it. ``on_failure`` runs
    when the committer itself fails (not one operation): the backend drops
    whatever it batches into queued operations (see ``_fail_everything``).
    """

    def __init__(
        self,
        db: Transactions,
        *,
        name: str,
        inline: bool,
        sync_commits: bool,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._name = name
        self.inline = inline
        self._sync_commits = sync_commits
        self._on_failure = on_failure
        # Operations waiting for the committer's next transaction, in order.
        self._pending: list[_Op] = []
        # Operations whose arguments are made as their group is taken
        # (call_sealed); they run last in it. Trio thread only.
        self._sealing: list[_Op] = []
        self._work = trio.Event()  # set when _pending or _sealing gets an operation
        self._done = trio.Event()  # the committer task ended
        self._sync_thread: SyncThread | None = None  # the COMMITs of sync_commits
        # Set once, by whoever sees the store fail first; later calls fail fast.
        self._failure: BaseException | None = None
        self._closed = False
        self._transactions = 0
        self._operations = 0
        self._largest_group = 0
        self._queued = 0
        # Set when an operation fails: the system watches it, so that a
        # failure nobody waits for (a submitted operation) still stops it.
        self.failed = trio.Event()

    def start(self) -> None:
        """Start the committer task (and the sync thread); nothing to do inline."""
        if self.inline:
            return
        if self._sync_commits:
            self._sync_thread = SyncThread(f"actors-sync:{self._name}")
        trio.lowlevel.spawn_system_task(self._commit_loop, name=f"actors-store:{self._name}")

    @property
    def failure(self) -> BaseException | None:
        """The first error of the committer or of an operation, if it failed."""
        return self._failure

    def fail(self, error: StoreError) -> None:
        """Fail the store from outside (the backend found it unusable): later calls fail fast."""
        if self._failure is None:
            self._failure = error
        self.failed.set()

    def statistics(self) -> CommitterStatistics:
        """Counters since start."""
        return CommitterStatistics(
            transactions=self._transactions,
            operations=self._operations,
            largest_group=self._largest_group,
            queued_operations=self._queued,
        )

    async def aclose(self) -> None:
        """Commit what is queued, then stop (shielded). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.inline:
            return
        with trio.CancelScope(shield=True):
            self._work.set()
            if not self._done.is_set():
                await self._done.wait()
            # Left over if the committer was cancelled (the run is ending).
            if self._pending or self._sealing:
                group = self._take_group()
                await trio.to_thread.run_sync(self._run_group_waiting, group, False)
                self._complete(group)
            if self._sync_thread is not None:
                self._sync_thread.close()

    # -- the trio side --------------------------------------------------

    async def call(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        committed: Callable[[T], None] | None = None,
    ) -> T:
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
        if self.inline:
            self._queued += 1
            op = _Op(fn, args, None, committed)
            self._run_group([op])
            self._complete([op])
            await trio.lowlevel.cancel_shielded_checkpoint()
            result: T = _result(op)
            return result
        return await self._wait_for(  # type: ignore[no-any-return]
            _Op(fn, args, trio.lowlevel.current_task(), committed), self._pending
        )

    async def call_sealed(
        self,
        fn: Callable[[*Ts], T],
        seal: Callable[[], tuple[*Ts]],
        *,
        committed: Callable[[T], None] | None = None,
    ) -> T:
        """As :meth:`call`, but the arguments are ``seal()``'s, made as late as possible.

        ``seal()`` runs on the trio thread when the committer takes the group
        that will run ``fn``, right before its transaction, and the operation
        runs last in that group: after every operation queued before the
        seal, as if it had been queued at that moment.
        """
        self._check_usable()
        if self.inline:
            return await self.call(fn, *seal(), committed=committed)
        op = _Op(fn, (), trio.lowlevel.current_task(), committed)
        op.seal = seal
        return await self._wait_for(op, self._sealing)  # type: ignore[no-any-return]

    def submit(self, fn: Callable[[*Ts], T], *args: *Ts, done: Callable[[T], None]) -> None:
        """Queue ``fn(*args)`` without waiting; ``done(result)`` runs after the commit.

        If the operation fails, ``done`` is not called; the store is marked
        failed (``failed`` is set) and later calls raise StoreError.
        """
        self._check_usable()
        op = _Op(fn, args, None, done)
        self._queued += 1
        if self.inline:
            self._run_group([op])
            self._complete([op])
        else:
            self._pending.append(op)
            self._work.set()

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
        self._on_failure()
        try:
            self._db.rollback()
        except Exception as rollback_error:  # closing ends it anyway
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

    # -- the committer task -----------------------------------------------

    async def _commit_loop(self) -> None:
        """Run the queued operations, a group transaction at a time, until closed.

        A system task: it must not raise (trio would crash the run, and the
        tasks waiting for a commit would never wake). A group that fails
        marks the store failed (``_complete``), and the system stops on that;
        anything else that escapes (a bug, an error the database was not
        expected to raise there) fails the store and every waiting operation
        with StoreError (``_fail_everything``), and the committer ends.
        """
        wait_idle = idle_waiter()
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
                # meanwhile joins this transaction, and the database never
                # keeps a runnable task waiting for long.
                with trio.move_on_after(IDLE_WAIT):
                    await wait_idle()
                group = self._take_group()
                await self._commit_group(group)
                self._complete(group)
                group = []  # (its operations' arguments: nothing waits here for the next)
                if self._db.maintenance_due():
                    await self._db.maintain()
        except trio.Cancelled:
            # The run is ending (system tasks are cancelled last). A group
            # taken but not run goes back, for aclose (its operations are
            # safe to run twice).
            self._pending[:0] = [op for op in group if not op.finished]
            raise
        except BaseException as exc:
            self._fail_everything(exc, group)
        finally:
            self._done.set()

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

        The operations run on the trio thread; the COMMIT too, unless it
        syncs (``sync_commits``). A worker thread takes the group when
        another connection holds the write lock (it waits for it there), and
        the operations of a group that failed (each alone, as _run_group).
        """
        try:
            began = self._db.try_begin()
        except Exception as exc:
            # The database could not be read (an I/O error, corruption, no
            # memory, the WAL index). Nothing ran; the group fails as one
            # whose transaction failed (each alone, then).
            self._count_group(group)
            if self._group_failed(group, exc):
                await trio.to_thread.run_sync(self._run_group_waiting, group, True)
            return
        if not began:
            await trio.to_thread.run_sync(self._run_group_waiting, group, False)
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
        self._db.wait_for_locks(True)
        try:
            if isolate:
                self._isolate(group)
            else:
                self._run_group(group)
        finally:
            self._db.wait_for_locks(False)

    def _count_group(self, group: Sequence[_Op]) -> None:
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
        # A lost connection is not the operations' failure: the backend
        # reconnects and they run again, until the database is back (their
        # callers wait, as for any commit).
        attempt = 0
        while True:
            try:
                self._db.begin()
                self._apply(ops)
                self._commit()
                return
            except Exception as exc:
                attempt += 1
                if not self._db.reconnect(exc, attempt):
                    raise

    def _apply(self, ops: Sequence[_Op]) -> None:
        """Run ``ops`` in the open transaction; on failure roll it back and raise."""
        try:
            for op in ops:
                op.result = op.fn(*op.args)
            self._db.finish()
        except BaseException:
            self._db.rollback()
            raise

    def _commit(self) -> None:
        """Commit the open transaction (rolled back and raised if that fails)."""
        self._db.commit()
        self._transactions += 1
