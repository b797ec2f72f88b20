"""The committer's transactions on the SQLite connection, and its WAL checkpoints.

Checkpoints are out of the COMMIT: SQLite's automatic checkpoint would copy
the WAL into the database file inside the commit that crosses its
threshold, on the loop. A WAL hook (``_on_wal``) notes the WAL's size after
each commit instead; past ``CHECKPOINT_PAGES`` the bulk of a checkpoint runs
in a thread of its own beside the commits (sqlite_checkpointer.py), then a
short one between two transactions (``maintain``), after which the next
commit starts the WAL over.
"""

from __future__ import annotations

import logging

import apsw
import trio

from .errors import log_exceptions
from .sqlite_checkpointer import Checkpointer
from .sqlite_ops import Operations

log = logging.getLogger("actors.store")

# WAL pages after which a checkpoint starts (SQLite's autocheckpoint
# default): the bulk beside the commits, then a short one between two
# transactions. Past WAL_LIMIT_PAGES (the bulk could not keep up) the
# committer checkpoints all of it with the commits held.
CHECKPOINT_PAGES = 1000
WAL_LIMIT_PAGES = 8 * CHECKPOINT_PAGES


class SqliteTransactions:
    """``Transactions`` (committer.py) on an apsw connection in WAL mode.

    ``threaded``: the committer runs as a task, on the loop, so a lock held
    by another connection is not waited for here (busy timeout 0: the
    committer gives such a group to a worker thread) and checkpoints leave
    the commit. Inline (virtual time), the connection keeps its busy
    timeout and SQLite's own checkpoints.
    """

    def __init__(
        self, db: apsw.Connection, ops: Operations, path: str, busy_ms: int, *, threaded: bool
    ) -> None:
        self._db = db
        self._ops = ops
        self._path = path
        self._busy_ms = busy_ms
        self._seq_before = 0  # ops.next_seq when the transaction began
        self.wal_pages = 0  # pages in the WAL after the last commit (_on_wal)
        self.checkpoints = 0  # short checkpoints between transactions
        self._checkpointer: Checkpointer | None = None
        self._bulk_seen = 0  # the checkpointer's passes already followed up
        if threaded:
            db.set_busy_timeout(0)
            db.set_wal_hook(self._on_wal)  # (replaces SQLite's autocheckpoint)
            self._checkpointer = Checkpointer(path)

    @property
    def bulk_checkpoints(self) -> int:
        """Checkpoints the checkpoint thread finished."""
        return self._checkpointer.finished if self._checkpointer is not None else 0

    def try_begin(self) -> bool:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            return False
        self._seq_before = self._ops.next_seq
        return True

    def begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._seq_before = self._ops.next_seq

    def finish(self) -> None:
        seq = self._ops.next_seq
        if seq != self._seq_before:
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq,))

    def commit(self) -> None:
        try:
            self._db.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def wait_for_locks(self, wait: bool) -> None:
        self._db.set_busy_timeout(self._busy_ms if wait else 0)

    def reconnect(self, exc: Exception, attempt: int) -> bool:
        return False  # (a file: nothing to reconnect to; its errors are the operations')

    def maintenance_due(self) -> bool:
        return self.wal_pages >= CHECKPOINT_PAGES

    async def maintain(self) -> None:
        """The WAL is past CHECKPOINT_PAGES: start the bulk, or finish after it.

        The short checkpoint between transactions (in a worker thread, the
        commits held) copies what the bulk did not: the frames committed
        while it ran. Then nothing is left, and the next commit rewinds the
        WAL. Past WAL_LIMIT_PAGES it copies everything, as a last resort.
        """
        ck = self._checkpointer
        assert ck is not None
        if ck.finished > self._bulk_seen or self.wal_pages >= WAL_LIMIT_PAGES:
            self._bulk_seen = ck.finished
            self.wal_pages = 0
            await trio.to_thread.run_sync(self._checkpoint)
        else:
            ck.request()

    def _on_wal(self, db: apsw.Connection, name: str, pages: int) -> int:
        # SQLite's WAL hook, after each commit: note the size; the committer
        # then asks for a checkpoint (not inside the commit, on the loop).
        self.wal_pages = pages
        return apsw.SQLITE_OK

    def _checkpoint(self) -> None:
        # Nothing is lost if it fails: the WAL stays, and is checkpointed later.
        with log_exceptions(log, f"a WAL checkpoint of {self._path!r} failed"):
            self._db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            self.checkpoints += 1

    def close_checkpointer(self) -> None:
        """Stop the checkpoint thread (blocking: it waits for a pass under way)."""
        if self._checkpointer is not None:
            self._checkpointer.close()
