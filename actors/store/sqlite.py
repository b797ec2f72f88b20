"""``SqliteStore``: the :class:`~actors.store.protocol.Store` on an SQLite file.

One apsw connection in WAL mode, used by the committer (committer.py) and
nothing else; each method of the protocol queues one operation of
sqlite_ops.py for it. The per-message methods are plain functions that
return the committer's coroutine, not coroutines of their own: a task that
waits resumes through no frame of the store's.

Two reads do not go through the committer: :meth:`SqliteStore.dead_letters`
and :meth:`SqliteStore.has_open_requests` use a read-only connection of
their own on the trio thread (WAL: a reader never blocks the writer).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import apsw
import trio

from .._records import DeadLetter
from .committed import CommittedStore
from .committer import Committer, virtual_time
from .errors import StoreError, map_exceptions
from .protocol import StartMarks
from .records import (
    Opened,
    StoreStatistics,
)
from .sqlite_ops import Operations
from .sqlite_schema import Prepared, close_quietly, open_database
from .sqlite_transactions import SqliteTransactions
from .sqlite_views import connect_reader, has_open_requests, read_dead_letters
from .starts import StartTable, database_identity

if TYPE_CHECKING:
    from .protocol import Store


class SqliteStore(CommittedStore):
    """The database behind a running system. Open it with :meth:`open`.

    See the ``Store`` protocol for what each method promises; the operations
    that go through the committer are CommittedStore's (committed.py).
    """

    def __init__(
        self, path: str, prepared: Prepared, durability: str, busy_ms: int, *, inline: bool
    ) -> None:
        self._path = path
        self._busy_ms = busy_ms
        # (device, inode) of the file opened; check_file() compares the path's with it.
        self.identity = prepared.identity
        self._starts: StartTable | None = prepared.starts
        self._max_value_bytes = prepared.max_value_bytes
        self._db = prepared.db
        ops = Operations(prepared.db, prepared.next_seq, prepared.has_state)
        self._tx = SqliteTransactions(prepared.db, ops, path, busy_ms, threaded=not inline)
        committer = Committer(
            self._tx,
            name=path,
            inline=inline,
            sync_commits=durability == "full",
            on_failure=self._drop_ack_box,
        )
        super().__init__(ops, committer)
        # Read-only connections, opened at their first read: one for dead
        # letters, one for the control table's look (trio thread only).
        self._readers: dict[str, apsw.Connection] = {}
        self._closed = False
        # Built only by open(), in the trio run that will use it: commit from now on.
        self._committer.start()

    @classmethod
    async def open(
        cls, path: str, *, durability: str, busy_timeout: float
    ) -> tuple[SqliteStore, Opened]:
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
        busy_ms = int(busy_timeout * 1000)
        inline = virtual_time()
        if inline:
            # Virtual time: SQLite runs on the loop thread, so that an
            # autojumping clock never skips ahead while a transaction runs.
            prepared = open_database(path, durability, busy_ms)
        else:
            # (Not cancellable: the thread runs to the end either way.)
            prepared = await trio.to_thread.run_sync(open_database, path, durability, busy_ms)
        store = cls(path, prepared, durability, busy_ms, inline=inline)
        return store, prepared.opened

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The readers first: closed last, the writer checkpoints the WAL and
        # removes it, as it could not with another connection open.
        for reader in self._readers.values():
            close_quietly(reader, self._path)
        self._readers.clear()
        with trio.CancelScope(shield=True):
            await self._committer.aclose()
            if self._committer.inline:
                close_quietly(self._db, self._path)
            else:
                await trio.to_thread.run_sync(self._tx.close_checkpointer)
                # (Closing checkpoints the WAL: that is disk work.)
                await trio.to_thread.run_sync(close_quietly, self._db, self._path)
        if self._starts is not None:
            self._starts.close()
            self._starts = None

    # -- what it is ------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def max_value_bytes(self) -> int:
        return self._max_value_bytes

    @property
    def starts(self) -> StartMarks | None:
        return self._starts

    @property
    def cluster(self) -> None:
        return None  # (one process owns the file: see _lock.py)

    def statistics(self) -> StoreStatistics:
        committer = self._committer.statistics()
        return StoreStatistics(
            transactions=committer.transactions,
            operations=committer.operations,
            largest_group=committer.largest_group,
            queued_operations=committer.queued_operations,
            checkpoints=self._tx.checkpoints,
            bulk_checkpoints=self._tx.bulk_checkpoints,
            wal_pages=self._tx.wal_pages,
        )

    def check_file(self) -> None:
        # SQLite goes on writing to the file it has open, even once no name
        # leads to it: send() would go on acknowledging messages that the
        # next start, opening the path, would never see.
        if self._committer.failure is not None:
            return
        try:
            now = database_identity(self._path)
        except OSError as exc:
            problem = f"can no longer be found ({exc.strerror or exc})"
        else:
            if now == self.identity:
                return
            problem = "was replaced by another file"
        error = StoreError(
            f"the database file {self._path!r} {problem} while the system ran: what it"
            " wrote since went to a file that the next start would not open; stopping"
        )
        self._committer.fail(error)
        raise error

    # -- operators' changes ---------------------------------------------------------

    def dead_letters(self, session_id: str | None, limit: int | None) -> list[DeadLetter]:
        with (
            map_exceptions(f"cannot read dead letters from {self._path!r}"),
            self._reading("dead letters") as reader,
        ):
            return read_dead_letters(reader, session_id, limit)

    @contextmanager
    def _reading(self, purpose: str) -> Iterator[apsw.Connection]:
        """The read-only connection for ``purpose``, kept open; once closed, one for this read."""
        if not self._closed:
            reader = self._readers.get(purpose)
            if reader is None:
                reader = self._readers[purpose] = connect_reader(self._path, self._busy_ms)
            yield reader
            return
        reader = connect_reader(self._path, self._busy_ms)
        try:
            yield reader
        finally:
            reader.close()

    # -- heartbeat and control table --------------------------------------------------

    def has_open_requests(self) -> bool:
        with (
            map_exceptions(f"cannot read the control table of {self._path!r}"),
            self._reading("control") as reader,
        ):
            return has_open_requests(reader)


if TYPE_CHECKING:

    def _implements_the_protocol(store: SqliteStore) -> Store:
        return store  # mypy checks that SqliteStore is a Store
