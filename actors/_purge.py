"""Purging messages in batches: the one procedure behind every purge.

``System.purge`` (and through it a running system's control requests) and
the command line's purge with no system running (``DirectTarget``) delete
the same way: ``Store.purge`` again and again, each transaction at most
``PURGE_LIMIT`` messages, so that other work runs between them.
"""

from __future__ import annotations

from collections.abc import Callable

from .store import Store

PURGE_LIMIT = 10_000  # messages deleted per purge transaction


async def purge_batches(
    store: Store,
    session_id: str | None,
    dead_only: bool,
    before: float | None,
    deleted: Callable[[int, int, list[int]], None],
) -> int:
    """Run ``Store.purge`` until it finds no more; ``deleted(pending, dead, ids)`` after each batch.

    The arguments are checked already (``_validate.purge_scope``). Returns
    how many messages were deleted.
    """
    total = 0
    while True:
        purged = await store.purge(session_id, dead_only, before, PURGE_LIMIT)
        pending, dead, ids = purged.pending, purged.dead, purged.ids
        deleted(pending, dead, ids)
        total += pending + dead
        if pending + dead < PURGE_LIMIT:
            return total
