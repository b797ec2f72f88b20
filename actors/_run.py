"""``run_system``: the one way to get a running :class:`~actors.System`.

It validates the options and the handler, takes the database's lock, opens
the store, and builds the system with what it runs: the handler made into a
``Behaviour`` and the ``Context`` class its handlers see. It sits above both
``System`` and ``Context``, so neither imports the other's module at run time.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from ._config import Config, UnknownOptionError
from ._context import Context, actor_factory
from ._errors import StoreError
from ._host import Behaviour
from ._lock import DatabaseLock
from ._system import System
from ._validate import check_instance, check_number
from .store import Opened, Store, database_path
from .store.buckets import check_buckets
from .store.postgres_url import is_url
from .store.sqlite import SqliteStore


@asynccontextmanager
async def run_system(
    path: str | os.PathLike[str] = "actors.db",
    *,
    handler: object,
    rng: random.Random | None = None,
    **options: Any,
) -> AsyncIterator[System]:
    """Run a durable actor system on the SQLite database at ``path``, or on PostgreSQL.

    ``path`` is an SQLite file, or a URL that starts with ``postgresql://``
    or ``postgres://``: then the PostgreSQL store (``pip install
    actors[postgres]``) shares the database with every other process that
    runs a system on it, a cluster (see docs/howto-cluster.md). The
    database must exist; its tables are created on first use.

    ``handler`` is ``async def handler(ctx, msg)`` or an :class:`Actor`
    subclass. ``options`` are those of :class:`Config` (``max_attempts``,
    ``handler_timeout``, ``idle_timeout``, ``max_active``, ...), and on
    PostgreSQL ``lease_ttl`` (seconds a process holds its sessions without
    renewing, default 10) and ``buckets`` (how many buckets sessions are
    hashed into, fixed when the schema is created, default 1024). ``rng``
    seeds retry jitter, for reproducible tests.

    On entry the database is opened (created if missing), locked for this
    system, and recovered: messages a dead process left in flight go back to
    pending at once, and sessions with work get actors, oldest work first.
    (On PostgreSQL nothing is locked: this process takes its share of the
    buckets, and recovers what a dead owner left in them as it takes them.)
    Leaving the block stops gracefully: sends are refused, running handlers
    get ``shutdown_timeout`` seconds, then are cancelled; unfinished
    messages stay pending for the next start. ``System.shutdown(grace)``
    stops the same way from any task (a signal handler) and ends the block,
    which then exits normally.

    Raises:
      TypeError / ValueError: bad ``handler``, path, ``rng`` or options
        (before anything is opened; see Config for the ranges). An option
        unknown, or meaningless for the database given, raises
        ``UnknownOptionError``, which is both.
      DatabaseInUseError: another running system owns the SQLite database.
      StoreError: the database cannot be opened, or failed while running.
    """
    # Options, handler and rng are validated before anything is opened.
    url = path if isinstance(path, str) and is_url(path) else None
    if url is not None:
        lease_ttl, buckets = _cluster_options(options)
    else:
        _refuse_cluster_options(options, path)
    config = Config.from_options(options)
    behaviour = actor_factory(handler)
    check_instance("rng", rng, random.Random, optional=True)
    if url is not None:
        from .store.postgres import PgStore  # (psycopg: the postgres extra)

        store: Store
        store, opened = await PgStore.open(url, lease_ttl=lease_ttl, buckets=buckets)
        async with _system(store, opened, config, behaviour, rng, store.path, url) as system:
            yield system
        return
    db_path = database_path(path)
    with _locked(db_path) as lock:
        sqlite, opened = await SqliteStore.open(
            db_path, durability=config.durability, busy_timeout=config.busy_timeout
        )
        try:
            _check_opened(sqlite, lock, config, db_path)
        except BaseException:
            await sqlite.aclose()
            raise
        async with _system(sqlite, opened, config, behaviour, rng, db_path, db_path) as system:
            yield system


_CLUSTER_ONLY = ("lease_ttl", "buckets")
_SQLITE_ONLY = ("durability", "busy_timeout")


def _refuse_cluster_options(options: dict[str, Any], path: object) -> None:
    for name in _CLUSTER_ONLY:
        if name in options:
            raise UnknownOptionError(
                f"run_system() option {name!r} is for PostgreSQL only; {path!r} is an SQLite file"
            )


def _cluster_options(options: dict[str, Any]) -> tuple[float, int | None]:
    """Take PostgreSQL's own options out of ``options``; refuse SQLite's."""
    for name in _SQLITE_ONLY:
        if name in options:
            raise UnknownOptionError(
                f"run_system() option {name!r} means nothing on PostgreSQL "
                "(the server's own settings decide durability and lock waits)"
            )
    lease_ttl = check_number(
        "lease_ttl", options.pop("lease_ttl", 10.0), minimum=0.2, maximum=3600.0
    )
    return lease_ttl, check_buckets(options.pop("buckets", None))


@asynccontextmanager
async def _system(
    store: Store,
    opened: Opened,
    config: Config,
    behaviour: Behaviour,
    rng: random.Random | None,
    path: str,
    target: str,
) -> AsyncIterator[System]:
    """Build the system on an opened store and run it (the store is closed either way)."""
    try:
        system = System(
            path=path,
            target=target,
            store=store,
            opened=opened,
            config=config,
            behaviour=behaviour,
            make_context=Context,
            rng=rng,
        )
    except BaseException:
        await store.aclose()
        raise
    async with system._running():
        yield system


@contextmanager
def _locked(db_path: str) -> Iterator[DatabaseLock]:
    """Hold the database's lock (what a refused attempt opened is released too)."""
    lock = DatabaseLock(db_path)
    try:
        try:
            lock.acquire()
        except OSError as exc:
            raise StoreError(f"cannot open database {db_path!r}: {exc}") from exc
        yield lock
    finally:
        lock.release()


def _check_opened(store: SqliteStore, lock: DatabaseLock, config: Config, db_path: str) -> None:
    if store.identity != lock.identity:  # renamed over between the two opens
        raise StoreError(f"the database file {db_path!r} was replaced while opening")
    if config.max_message_bytes > store.max_value_bytes:  # (an SQLite built smaller)
        raise ValueError(
            f"max_message_bytes={config.max_message_bytes} is more than this SQLite "
            f"stores in a row ({store.max_value_bytes} bytes)"
        )
