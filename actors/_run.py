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

from ._config import Config
from ._context import Context, actor_factory
from ._errors import StoreError
from ._lock import DatabaseLock
from ._system import System
from ._validate import check_instance
from .store import database_path
from .store.sqlite import SqliteStore


@asynccontextmanager
async def run_system(
    path: str | os.PathLike[str] = "actors.db",
    *,
    handler: object,
    rng: random.Random | None = None,
    **options: Any,
) -> AsyncIterator[System]:
    """Run a durable actor system on the SQLite database at ``path``.

    ``handler`` is ``async def handler(ctx, msg)`` or an :class:`Actor`
    subclass. ``options`` are those of :class:`Config` (``max_attempts``,
    ``handler_timeout``, ``idle_timeout``, ``max_active``, ...). ``rng``
    seeds retry jitter, for reproducible tests.

    On entry the database is opened (created if missing), locked for this
    system, and recovered: messages a dead process left in flight go back to
    pending at once, and sessions with work get actors, oldest work first.
    Leaving the block stops gracefully: sends are refused, running handlers
    get ``shutdown_timeout`` seconds, then are cancelled; unfinished
    messages stay pending for the next start. ``System.shutdown(grace)``
    stops the same way from any task (a signal handler) and ends the block,
    which then exits normally.

    Raises:
      TypeError / ValueError: bad ``handler``, path, ``rng`` or options
        (before anything is opened; see Config for the ranges).
      DatabaseInUseError: another running system owns the database.
      StoreError: the database cannot be opened, or failed while running.
    """
    config = Config.from_options(options)
    behaviour = actor_factory(handler)  # validated before the file is touched
    check_instance("rng", rng, random.Random, optional=True)
    db_path = database_path(path)
    with _locked(db_path) as lock:
        store, opened = await SqliteStore.open(
            db_path, durability=config.durability, busy_timeout=config.busy_timeout
        )
        try:
            _check_opened(store, lock, config, db_path)
            system = System(
                path=db_path,
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
