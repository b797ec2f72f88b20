"""``PgStore``: the :class:`~actors.store.protocol.Store` on PostgreSQL, for a cluster.

Several processes, on one host or many, open the same database and share
its work by bucket leases (postgres_cluster.py): each runs the engine for
the sessions of the buckets it holds, and every write it makes for them is
fenced (postgres_ops.py). One psycopg connection, used by the group
committer (committer.py, as the SQLite store uses it) in a worker thread:
psycopg's asynchronous API runs on asyncio only, so its synchronous one
runs a whole group transaction per thread hop. Under trio's MockClock the
committer runs inline, on the trio thread, as it does for SQLite.

A second connection takes blocks of ids (``actors_meta.next_id``) in
statements of their own, so that the counter's row is locked for one
statement, never for a group transaction; a third reads for the trio
thread (dead letters, the control table's look).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import psycopg
import trio

from .._records import DeadLetter
from .committed import CommittedStore, ignore
from .committer import Committer, virtual_time
from .errors import StoreError
from .postgres_cluster import PgCluster, new_member_id
from .postgres_ops import IdBlocks, Operations
from .postgres_ownership import Ownership
from .postgres_schema import connect, prepare_schema
from .postgres_sends import SendOperations
from .postgres_url import redact
from .postgres_views import dead_letter_query, dead_letters_of
from .protocol import StartMarks
from .records import AppendBatch, Appended, Opened, StoreStatistics

if TYPE_CHECKING:
    from .protocol import Store

log = logging.getLogger("actors.store")

# The largest value a row holds here: PostgreSQL's limit on a field is 1 GB;
# the runtime refuses far less (max_message_bytes) long before.
MAX_VALUE_BYTES = 256 << 20


# How long the committer goes on reconnecting before the store fails, and
# the longest pause between two tries.
RECONNECT_FOR = 600.0
RECONNECT_PAUSE_MAX = 2.0


def _retryable(exc: Exception, conn: psycopg.Connection[Any]) -> bool:
    """Whether a transaction that failed with ``exc`` should run again after
    reconnecting: the connection broke, or the server asks for a retry."""
    if isinstance(exc, psycopg.errors.TransactionRollback):  # (deadlock, serialization)
        return True
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return conn.closed or conn.broken


def _connect(url: str, lease_ttl: float, buckets: int | None) -> tuple[Connections, int, Opened]:
    """The writers' and the ids' connections, the schema made (blocking)."""
    conn = _writer(url, lease_ttl)
    ids_conn: psycopg.Connection[Any] | None = None
    sends_conn: psycopg.Connection[Any] | None = None
    try:
        count = prepare_schema(conn, url, buckets)
        ids_conn = connect(url, autocommit=True, what="cannot connect")
        sends_conn = _writer(url, lease_ttl, autocommit=True)
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state < 2), count(*) FILTER (WHERE state = 2)"
            " FROM actors_messages"
        ).fetchone()
        conn.commit()
    except BaseException as exc:
        for opened in (conn, ids_conn, sends_conn):
            if opened is not None:
                opened.close()
        if isinstance(exc, psycopg.Error):
            raise StoreError(f"cannot open the database {redact(url)}: {exc}") from exc
        raise
    assert row is not None
    opened_ = Opened(pending=int(row[0]), dead=int(row[1]), recovered=0)
    return (conn, ids_conn, sends_conn), count, opened_


# The committer's, the ids', the sends' committer's.
Connections = tuple[psycopg.Connection[Any], psycopg.Connection[Any], psycopg.Connection[Any]]


def _writer(url: str, lease_ttl: float, *, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A committer's connection (blocking); the sends' is in autocommit (postgres_sends.py)."""
    # A frozen process's open transaction would hold its bucket rows'
    # locks, and so the takeover, hostage: the server ends it.
    idle_ms = str(max(500, int(lease_ttl * 500)))
    conn = connect(url, autocommit=autocommit, what="cannot connect")
    try:
        conn.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)", (idle_ms,)
        )
        conn.commit()
    except BaseException:
        conn.close()
        raise
    return conn


class PgTransactions:
    """``Transactions`` (committer.py) on a psycopg connection.

    Every group runs in a worker thread (``try_begin`` says no at once):
    a transaction is round trips to the server, which must not hold the
    loop. A transaction begins implicitly at its first statement.

    A lost connection (the server restarted, a network cut, the connection
    killed) is not the operations' failure: :meth:`reconnect` waits and
    reconnects, and the committer runs them again, for up to
    ``RECONNECT_FOR`` seconds; their callers wait meanwhile. If the
    connection was lost during the COMMIT, the first run may have committed:
    the second takes the same ids and skips the rows already there; a claim
    may count its attempt twice.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        ops: Operations,
        reopen: Callable[[], psycopg.Connection[Any]],
        shown: str,
    ) -> None:
        self._conn = conn
        self._ops = ops
        self._reopen = reopen
        self._shown = shown
        self._lost_since: float | None = None
        self.reconnects = 0

    def try_begin(self) -> bool:
        return False

    def begin(self) -> None:
        self._ops.begin()

    def finish(self) -> None:
        self._ops.finish()

    def commit(self) -> None:
        try:
            self._conn.commit()
        except BaseException:
            self.rollback()
            raise
        self._ops.committed()

    def rollback(self) -> None:
        if not self._conn.closed:
            self._conn.rollback()

    def wait_for_locks(self, wait: bool) -> None:
        pass

    def reconnect(self, exc: Exception, attempt: int) -> bool:
        if not _retryable(exc, self._conn):
            return False
        now = time.monotonic()
        if attempt == 1 or self._lost_since is None:
            self._lost_since = now
            log.warning("lost the connection to %s (%s); reconnecting", self._shown, exc)
        if now - self._lost_since > RECONNECT_FOR:
            return False
        time.sleep(min(RECONNECT_PAUSE_MAX, 0.05 * 2 ** min(attempt, 8)))
        try:
            self._conn = self._reopen()
        except StoreError as error:
            log.info("reconnecting to %s failed (%s); trying again", self._shown, error)
            return True
        self._ops.rewind()
        self.reconnects += 1
        log.warning("reconnected to %s; running the transaction again", self._shown)
        self._lost_since = None
        return True

    def maintenance_due(self) -> bool:
        return False

    async def maintain(self) -> None:
        pass


class PgStore(CommittedStore):
    """The database behind one process of a cluster. Open it with :meth:`open`.

    The operations that go through the committer are CommittedStore's
    (committed.py), on this module's fenced Operations. Sends have a
    committer and a connection of their own: an insert needs no fence, and
    a send waiting behind a group of claims (round trips each) waited for
    all of them. So a send is not claimed on delivery here (the claim would
    need the fence): its owner claims it.
    """

    def __init__(
        self,
        url: str,
        connections: Connections,
        own: Ownership,
        lease_ttl: float,
        *,
        inline: bool,
    ) -> None:
        conn, self._ids_conn, sends_conn = connections
        self._url = url
        self._shown = redact(url)
        self._conn = conn
        self._reader: psycopg.Connection[Any] | None = None
        self._reader_lock = threading.Lock()
        self.own = own
        ids = IdBlocks(self._take_ids)
        self._pg_ops = ops = Operations(conn, ids, own, claim_margin=lease_ttl / 4)
        self._lease_ttl = lease_ttl
        self._tx = PgTransactions(conn, ops, self._reopen, self._shown)
        committer = Committer(
            self._tx,
            name=self._shown,
            inline=inline,
            sync_commits=False,
            on_failure=self._drop_ack_box,
        )
        super().__init__(ops, committer)
        self._sends_ops = SendOperations(sends_conn, ids, own, claim_margin=lease_ttl / 4)
        self._sends_tx = PgTransactions(
            sends_conn, self._sends_ops, self._reopen_sends, self._shown
        )
        self._sends = Committer(self._sends_tx, name=self._shown, inline=inline, sync_commits=False)
        # One failure for the store, whichever committer saw it.
        self._sends.failed = committer.failed
        self._cluster = PgCluster(
            url,
            own,
            lease_ttl,
            inline=inline,
            remote_asks=ops.remote_asks,
            post_replies=self._post_replies,
            post_outputs=self._post_outputs,
            after_commits=self.after_commits,
            post_kill=self._post_kill,
            processed=lambda: ops.processed,
        )
        self._closed = False
        self._committer.start()
        self._sends.start()

    @classmethod
    async def open(
        cls, url: str, *, lease_ttl: float, buckets: int | None
    ) -> tuple[PgStore, Opened]:
        """Connect, create or migrate the schema, and join the cluster's members.

        No recovery here: what a dead process left in flight goes back to
        pending when its buckets are taken over (postgres_leases.take).

        Raises:
          StoreError: the database cannot be reached or is not usable
            (SchemaVersionError: a newer schema).
          ValueError: ``buckets`` differs from the database's.
        """
        inline = virtual_time()
        if inline:
            connections, count, opened = _connect(url, lease_ttl, buckets)
        else:
            connections, count, opened = await trio.to_thread.run_sync(
                _connect, url, lease_ttl, buckets
            )
        # (Built on the trio thread: the committer starts its task.)
        own = Ownership(new_member_id(), count)
        return cls(url, connections, own, lease_ttl, inline=inline), opened

    def _reopen(self) -> psycopg.Connection[Any]:
        """A new writer connection, after the old one was lost (blocking)."""
        self._conn.close()
        self._conn = _writer(self._url, self._lease_ttl)
        self._pg_ops.conn = self._conn
        return self._conn

    def _reopen_sends(self) -> psycopg.Connection[Any]:
        """A new connection for the sends, after the old one was lost (blocking)."""
        self._sends_ops.conn.close()
        self._sends_ops.conn = _writer(self._url, self._lease_ttl, autocommit=True)
        return self._sends_ops.conn

    def _take_ids(self, n: int) -> int:
        """The first of ``n`` fresh consecutive ids, from the database's counter
        (IdBlocks calls it, one thread at a time; a lost connection is made
        again, once)."""
        for attempt in (1, 2):
            try:
                row = self._ids_conn.execute(
                    "UPDATE actors_meta SET value = (value::bigint + %s)::text"
                    " WHERE key = 'next_id' RETURNING value::bigint - %s",
                    (n, n),
                ).fetchone()
                assert row is not None
                return int(row[0])
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._ids_conn.close()
                self._ids_conn = connect(self._url, autocommit=True, what="cannot reconnect")
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def append(
        self,
        seal: Callable[[], AppendBatch],
        *,
        committed: Callable[[Appended], None] | None = None,
    ) -> Coroutine[Any, Any, Appended]:
        return self._sends.call_sealed(self._sends_ops.append, seal, committed=committed)

    @property
    def failure(self) -> BaseException | None:
        return self._committer.failure or self._sends.failure

    def after_commits(self, done: Callable[[], None]) -> None:
        # Both committers' operations: a bucket is given back after this, and
        # a send that committed later would have told nobody of its message
        # (its transaction saw the bucket held, so sent no notice).
        left = [2]

        def one(_: object) -> None:
            left[0] -= 1
            if not left[0]:
                done()

        self._committer.submit(self._pg_ops.nothing, done=one)
        self._sends.submit(self._sends_ops.nothing, done=one)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._sends.aclose()
            await self._committer.aclose()
            await self._cluster.leave()
            for conn in (self._conn, self._ids_conn, self._sends_ops.conn, self._reader):
                if conn is not None:
                    conn.close()

    # -- what it is ------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._shown

    @property
    def cluster(self) -> PgCluster:
        return self._cluster

    @property
    def max_value_bytes(self) -> int:
        return MAX_VALUE_BYTES

    @property
    def starts(self) -> StartMarks | None:
        return None

    def statistics(self) -> StoreStatistics:
        committer, sends = self._committer.statistics(), self._sends.statistics()
        return StoreStatistics(
            transactions=committer.transactions + sends.transactions,
            operations=committer.operations + sends.operations,
            largest_group=max(committer.largest_group, sends.largest_group),
            queued_operations=committer.queued_operations + sends.queued_operations,
            checkpoints=0,
            bulk_checkpoints=0,
            wal_pages=0,
        )

    @property
    def reconnects(self) -> int:
        """How many times the committer reconnected after losing its connection."""
        return self._tx.reconnects + self._sends_tx.reconnects

    def check_file(self) -> None:
        pass  # (a server, not a file: nothing can replace it under the store)

    def _post_replies(self, replies: list[tuple[int, str, str]]) -> None:
        if self._committer.failure is None and not self._closed:
            self._committer.submit(self._pg_ops.post_replies, replies, done=ignore)

    def _post_kill(self, session_id: str) -> bool:
        if self._committer.failure is not None or self._closed:
            return False
        self._committer.submit(self._pg_ops.post_kill, session_id, done=ignore)
        return True

    def _post_outputs(self, outputs: list[tuple[str, str, str]]) -> None:
        if self._committer.failure is None and not self._closed:
            self._committer.submit(self._pg_ops.post_outputs, outputs, done=ignore)

    # -- operators' changes ---------------------------------------------------------

    def dead_letters(self, session_id: str | None, limit: int | None) -> list[DeadLetter]:
        sql, params = dead_letter_query(session_id, limit)
        return dead_letters_of(self._read(sql, params, "cannot read dead letters"))

    def _read(self, sql: str, params: list[Any], what: str) -> list[Any]:
        """A read on the reader connection (trio thread; a short, indexed query)."""
        try:
            with self._reader_lock:
                if self._reader is None or self._reader.closed:
                    self._reader = connect(self._url, autocommit=True, what=what)
                return self._reader.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            raise StoreError(f"{what} from {self._shown}: {exc}") from exc

    # -- heartbeat and control table --------------------------------------------------

    def has_open_requests(self) -> bool:
        rows = self._read(
            "SELECT EXISTS (SELECT 1 FROM actors_control WHERE done_at IS NULL)",
            [],
            "cannot read the control table",
        )
        return bool(rows[0][0])


if TYPE_CHECKING:

    def _implements_the_protocol(store: PgStore) -> Store:
        return store  # mypy checks that PgStore is a Store
