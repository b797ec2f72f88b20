"""The backend a target names, for the command line: an SQLite file or a PostgreSQL URL.

A target that :func:`is_url` says is PostgreSQL's is opened by the
PostgreSQL modules, imported only then (psycopg is the postgres extra):
the command line of an SQLite user never imports them.
"""

from __future__ import annotations

import importlib.util

from .errors import UnusableDatabaseError
from .postgres_url import is_url, redact
from .protocol import ControlRequests, Store, StoreViews
from .sqlite import SqliteStore
from .sqlite_views import SqliteControlRequests, SqliteViews

__all__ = ["is_url", "open_control_requests", "open_for_changes", "open_views", "redact"]

BUSY_TIMEOUT = 5.0  # seconds an SQLite connection waits for a lock
# What a store opened to apply an operator's change uses on PostgreSQL: the
# lease time bounds how long the server lets a stuck transaction of it idle.
_CHANGES_LEASE_TTL = 10.0


def _have_psycopg() -> bool:
    # (Found, not imported: the PostgreSQL modules import it when they open.)
    try:
        return importlib.util.find_spec("psycopg") is not None
    except (ValueError, AttributeError):  # sys.modules["psycopg"] = None: blocked
        return False


def _need_psycopg(url: str) -> None:
    if not _have_psycopg():
        raise UnusableDatabaseError(
            f"{redact(url)} is a PostgreSQL database, which needs psycopg: "
            "pip install 'actors[postgres]'"
        ) from None


def open_views(target: str, busy_timeout: float = BUSY_TIMEOUT) -> StoreViews:
    """Read views of an existing actors database (close them after use).

    Raises:
      UnusableDatabaseError: none there, unreachable, or no actors schema.
      SchemaVersionError: a schema newer than this version of actors.
    """
    if is_url(target):
        _need_psycopg(target)
        from .postgres_views import PgViews

        return PgViews.open(target)
    return SqliteViews.open(target, busy_timeout)


def open_control_requests(target: str, busy_timeout: float = BUSY_TIMEOUT) -> ControlRequests:
    """The control table of an existing actors database, to write requests into.

    Raises:
      StoreError: the database cannot be opened.
    """
    if is_url(target):
        _need_psycopg(target)
        from .postgres_views import PgControl

        return PgControl(target)
    return SqliteControlRequests(target, busy_timeout)


async def open_for_changes(target: str) -> Store:
    """The store of an actors database no system runs on, to apply an operator's change.

    SQLite: opened as a system opens it (the caller holds the lock), which
    recovers what a dead process left in flight, every commit synced.
    PostgreSQL: connected without joining the cluster (no bucket is taken,
    nothing is recovered: the member that takes a dead member's bucket over
    does that).

    Raises:
      StoreError: the database cannot be opened.
    """
    if is_url(target):
        _need_psycopg(target)
        from .postgres import PgStore

        store, _ = await PgStore.open(target, lease_ttl=_CHANGES_LEASE_TTL, buckets=None)
        return store
    sqlite, _ = await SqliteStore.open(target, durability="full", busy_timeout=BUSY_TIMEOUT)
    return sqlite
