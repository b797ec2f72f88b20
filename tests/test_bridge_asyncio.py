"""Bridge.subscribe_async: a session's outputs for an asyncio application."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import trio

import actors


async def times_ten(ctx: actors.Context, msg: actors.Message) -> int:
    return int(msg.body) * 10


def consume(bridge: actors.Bridge, ready: threading.Event, got: list[Any], stop_at: int) -> None:
    """An asyncio application in its own thread: read outputs until ``stop_at`` or the end."""

    async def main() -> None:
        async with bridge.subscribe_async("s") as outputs:
            ready.set()
            async for value in outputs:
                got.append(value)
                if len(got) == stop_at:
                    break

    asyncio.run(main())


async def test_asyncio_consumer_gets_outputs_in_order_until_the_system_stops(db_path: str) -> None:
    ready = threading.Event()
    got: list[Any] = []
    # The system's block is inside the nursery: leaving it stops the system,
    # and the nursery then waits for the consumer, whose loop ends by itself.
    async with (
        trio.open_nursery() as nursery,
        actors.run_system(db_path, handler=times_ten) as system,
    ):
        bridge = system.bridge()
        nursery.start_soon(trio.to_thread.run_sync, consume, bridge, ready, got, 0)
        await trio.to_thread.run_sync(ready.wait)
        for i in range(5):
            await system.send("s", i)
        await system.send("other", 99)  # another session's output is not streamed
        await system.drain()
    assert got == [0, 10, 20, 30, 40]


async def test_asyncio_consumer_that_leaves_releases_the_session(db_path: str) -> None:
    ready = threading.Event()
    got: list[Any] = []
    async with actors.run_system(db_path, handler=times_ten) as system:
        bridge = system.bridge()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, consume, bridge, ready, got, 2)
            await trio.to_thread.run_sync(ready.wait)
            for i in range(2):
                await system.send("s", i)
        # The consumer broke out after two values and closed its subscription:
        # more outputs than its buffer holds no longer hold the session back.
        assert not system._sup.outputs.listening("s")
        for i in range(2, 40):
            await system.send("s", i)
        await system.drain()
        assert system.statistics().processed == 40
    assert got == [0, 10]
