"""Server-Sent Events of a subscription, with its backpressure.

One event is formatted and written at a time: while the client reads
slowly, the write waits, the subscription's buffer fills, and then (for
``subscribe()``) the session's actor waits, as the library's own
backpressure does; ``events()`` drops for a slow reader instead. A comment
line every ``keepalive`` seconds keeps proxies from closing an idle
stream and finds a client that left.

The generator never yields inside a cancel scope (PEP 789): the wait for
the next item has its own scope, closed before the yield.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from .._admin import to_plain
from .._streams import Subscription

KEEPALIVE = 15.0
_NOTHING: Any = object()
HEADERS = {
    "Cache-Control": "no-store",
    # nginx buffers responses unless told not to: an event would wait there.
    "X-Accel-Buffering": "no",
}


def event_text(kind: str, data: Any) -> bytes:
    """One SSE event: ``event: kind`` and its data as one line of JSON."""
    payload = json.dumps(to_plain(data), ensure_ascii=False, default=repr)
    return f"event: {kind}\ndata: {payload}\n\n".encode()


async def stream_events(
    subscription: Subscription[Any],
    kind_of: Callable[[Any], str],
    stopping: trio.Event,
    keepalive: float = KEEPALIVE,
) -> AsyncIterator[bytes]:
    """The subscription as SSE, ending with an ``end`` event when it (or the app) ends."""
    try:
        yield b": stream open\n\n"
        while True:
            item: Any = _NOTHING
            ended = False
            with trio.move_on_after(keepalive):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on, stopping, nursery.cancel_scope)
                    try:
                        item = await subscription.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        ended = True
                    nursery.cancel_scope.cancel()
            if item is not _NOTHING:
                yield event_text(kind_of(item), item)
            elif ended or stopping.is_set():
                yield event_text("end", {})
                return
            else:
                yield b": keepalive\n\n"
    finally:
        subscription.close()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
