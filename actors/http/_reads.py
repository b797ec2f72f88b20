"""The listings (sessions, dead letters), read in a worker thread.

They read through a read-only connection of their own, as ``actors
sessions`` and ``actors dead`` do: a listing never waits for the running
system's writer nor blocks it, and the database's wait happens off the
trio thread. A page is the first ``offset + limit`` rows cut at
``offset`` (the views list from the top), so a deep page costs its depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from .. import _admin
from .._system import System

T = TypeVar("T")


async def read(system: System, reader: Callable[[Any], T]) -> T:
    """``reader(views)`` on fresh read views of the database, in a worker thread."""

    def run() -> T:
        views = system.open_views()
        try:
            return reader(views)
        finally:
            views.close()

    return await trio.to_thread.run_sync(run)


def sessions_page(
    views: Any, now: float, offset: int, limit: int, session_id: str | None
) -> dict[str, Any]:
    rows, total = _admin.sessions(views, now, limit=offset + limit, session_id=session_id)
    return {
        "sessions": _admin.to_plain(rows[offset:]),
        "total": total,
        "offset": offset,
        "limit": limit,
    }


def dead_page(views: Any, offset: int, limit: int, session_id: str | None) -> dict[str, Any]:
    letters, total = _admin.dead_letters(views, session_id, offset + limit)
    return {
        "dead_letters": _admin.to_plain(letters[offset:]),
        "total": total,
        "offset": offset,
        "limit": limit,
    }
