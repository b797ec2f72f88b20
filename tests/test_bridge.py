"""The bridge: a running system used from plain threads and from asyncio.

Every test runs on the real clock: threads do real work, and an autojumping
MockClock would jump over handler timeouts and idle timeouts while trio
waits for them. Nothing here waits with a sleep: threads are joined through
``trio.to_thread.run_sync``, and the trio side waits on events that the
threads set with ``trio.from_thread.run_sync``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from dblock import WriteLock

import actors
from actors.testing import fast_options, quiescent


class Refused(Exception):
    pass


async def echo(ctx: actors.Context, msg: actors.Message) -> Any:
    if msg.body == "refuse" and msg.attempt == 1:
        raise Refused("refused by the handler")
    return {"id": msg.id, "body": msg.body}


class Log:
    """Handler calls, as (session, id, body)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, Any]] = []

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> Any:
        self.calls.append((ctx.session_id, msg.id, msg.body))
        return await echo(ctx, msg)


# -- sending from threads --------------------------------------------------------


async def test_send_from_a_worker_thread_returns_the_durable_id(db_path: str) -> None:
    log = Log()
    async with actors.run_system(db_path, handler=log.handler) as system:
        bridge = system.bridge()

        def produce() -> list[int]:
            return [bridge.send("s", n) for n in range(20)]

        ids = await trio.to_thread.run_sync(produce)
        await system.drain()
        assert bridge.statistics() == actors.BridgeStatistics(calls=20, running=0)
    assert log.calls == [("s", i, n) for n, i in enumerate(ids)]


async def test_sends_from_many_plain_threads(db_path: str) -> None:
    log = Log()
    results: dict[int, list[int]] = {}

    async with actors.run_system(db_path, handler=log.handler) as system:
        bridge = system.bridge()

        def produce(t: int) -> None:
            results[t] = [bridge.send(f"thread-{t}", [t, n]) for n in range(25)]

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            await trio.to_thread.run_sync(thread.join)
        await system.drain()
    all_ids = [i for ids in results.values() for i in ids]
    assert len(set(all_ids)) == 100
    for t, ids in results.items():
        # Each thread's session got its messages, once each, in the thread's order.
        assert [(i, b) for s, i, b in log.calls if s == f"thread-{t}"] == [
            (i, [t, n]) for n, i in enumerate(ids)
        ]


async def test_send_with_a_key_from_a_thread_is_idempotent(db_path: str) -> None:
    log = Log()
    async with actors.run_system(db_path, handler=log.handler) as system:
        bridge = system.bridge()

        def produce() -> list[int]:
            return [bridge.send("s", "hook fired", key="tool-use-1") for _ in range(3)]

        ids = await trio.to_thread.run_sync(produce)
        await system.drain()
    assert len(set(ids)) == 1
    assert log.calls == [("s", ids[0], "hook fired")]


async def test_send_many_from_a_thread_is_one_transaction_with_keys(db_path: str) -> None:
    log = Log()
    async with actors.run_system(db_path, handler=log.handler) as system:
        bridge = system.bridge()
        batches = system._router.statistics().batches

        def produce() -> list[int]:
            return bridge.send_many(
                [("s", "a", "key-a"), ("s", "b"), ("s", "a again", "key-a"), ("t", "c", None)]
            )

        ids = await trio.to_thread.run_sync(produce)
        assert system._router.statistics().batches == batches + 1  # one store operation
        await system.drain()
    assert ids[2] == ids[0] and len(set(ids)) == 3
    assert sorted((s, b) for s, _, b in log.calls) == [("s", "a"), ("s", "b"), ("t", "c")]


async def test_ask_from_a_thread(db_path: str) -> None:
    release = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == "slow":
            await release.wait()
        return await echo(ctx, msg)

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        bridge = system.bridge()

        def client() -> list[Any]:
            out: list[Any] = [bridge.ask("s", "hello")]
            try:
                bridge.ask("s", "refuse")
            except Refused as exc:
                out.append(exc)
            try:
                bridge.ask("t", "slow", timeout=0.05)
            except actors.AskTimeoutError as exc:
                out.append(exc)
            return out

        reply, refused, timed_out = await trio.to_thread.run_sync(client)
        release.set()
        await quiescent(system)
        stats = system.statistics()
    assert reply["body"] == "hello"
    assert isinstance(refused, Refused) and str(refused) == "refused by the handler"
    assert isinstance(timed_out, TimeoutError)
    assert stats.processed == 3  # the refused one on its retry, the slow one after all


async def test_invalid_calls_from_a_thread_raise_there_and_persist_nothing(
    db_path: str,
) -> None:
    log = Log()
    async with actors.run_system(db_path, handler=log.handler) as system:
        bridge = system.bridge()

        def produce() -> list[tuple[type[BaseException], str]]:
            raised = []
            for call in (
                lambda: bridge.send(42, "not a session"),  # type: ignore[arg-type]
                lambda: bridge.send("s", {1, 2}),
                lambda: bridge.send("s", 1, key=""),
                lambda: bridge.send_many([("s", 1), ("s", object())]),
                lambda: bridge.ask("", 1),
            ):
                try:
                    call()
                except (TypeError, ValueError) as exc:
                    raised.append((type(exc), str(exc)))
            return raised

        raised = await trio.to_thread.run_sync(produce)
        assert system.statistics().sends == 0
        await system.send("s", "valid")
        await system.drain()
    assert [kind for kind, _ in raised] == [TypeError, TypeError, ValueError, TypeError, ValueError]
    assert raised[3][1].startswith("item 1:")  # send_many names the bad item
    assert [body for _, _, body in log.calls] == ["valid"]


# -- asyncio ------------------------------------------------------------------------


async def test_send_and_ask_from_an_asyncio_loop_in_a_thread(db_path: str) -> None:
    # The asyncio loop keeps running while a bridge call waits: the handler of
    # "waiter" holds its reply until "releaser" is handled, and only another
    # coroutine of the same loop sends to "releaser".
    released = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if ctx.session_id == "waiter":
            await released.wait()
        if ctx.session_id == "releaser":
            released.set()
        return await echo(ctx, msg)

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        bridge = system.bridge()

        async def application() -> tuple[Any, list[int], Any, BaseException | None]:
            async def release_later() -> int:
                await asyncio.sleep(0)
                return await bridge.send_async("releaser", "go")

            reply, released_id = await asyncio.gather(
                bridge.ask_async("waiter", "wait for the releaser"), release_later()
            )
            ids = await asyncio.gather(*(bridge.send_async("many", n) for n in range(30)))
            keyed = {await bridge.send_async("many", "k", key="same") for _ in range(3)}
            error: BaseException | None = None
            try:
                await bridge.ask_async("many", "refuse")
            except Refused as exc:
                error = exc
            return reply, [released_id, *ids, *keyed], keyed, error

        reply, ids, keyed, error = await trio.to_thread.run_sync(lambda: asyncio.run(application()))
        await quiescent(system)
        stats = system.statistics()
    assert reply["body"] == "wait for the releaser"
    assert len(keyed) == 1
    assert len(set(ids)) == 32
    assert isinstance(error, Refused)
    assert stats.dead == 0 and stats.processed == 34  # waiter, releaser, 30, keyed, refuse


# -- streaming to a thread ----------------------------------------------------------


async def test_subscribe_from_a_thread_is_a_blocking_iterator_with_backpressure(
    db_path: str,
) -> None:
    history: list[tuple[str, int]] = []
    lock = threading.Lock()

    def note(kind: str, n: int) -> None:
        with lock:
            history.append((kind, n))

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if ctx.session_id == "probe":
            return None
        note("start", msg.body)
        return msg.body

    subscribed = trio.Event()
    async with actors.run_system(db_path, handler=handler) as system:
        bridge = system.bridge()

        def consume() -> list[int]:
            got: list[int] = []
            with bridge.subscribe("s", buffer=1) as values:
                trio.from_thread.run_sync(subscribed.set)
                for n in range(8):
                    note("ask", n)
                    got.append(next(values))
                    # A slow consumer: a whole round trip through the system
                    # between reads, time for an unchecked actor to run ahead.
                    bridge.ask("probe", n)
            return got

        async with trio.open_nursery() as nursery:

            async def run_consumer() -> None:
                assert await trio.to_thread.run_sync(consume) == list(range(8))

            nursery.start_soon(run_consumer)
            await subscribed.wait()
            await system.send_many([("s", n) for n in range(8)])
        await system.drain()
    position = {entry: i for i, entry in enumerate(history)}
    # Backpressure: with a buffer of one, message n + 2 starts only after the
    # consumer asked for n's value (n + 1's value waits in the actor until
    # n's leaves the buffer).
    for n in range(6):
        assert position["start", n + 2] > position["ask", n], history


async def test_a_blocking_subscription_ends_when_the_system_stops(db_path: str) -> None:
    subscribed = trio.Event()
    got: list[Any] = []
    async with (
        trio.open_nursery() as nursery,
        actors.run_system(db_path, handler=echo) as system,
    ):
        bridge = system.bridge()

        def consume() -> None:
            values = bridge.subscribe("s")
            trio.from_thread.run_sync(subscribed.set)
            got.extend(value["body"] for value in values)  # until the system stops

        nursery.start_soon(trio.to_thread.run_sync, consume)
        await subscribed.wait()
        await system.send("s", "only")
        await system.drain()
    # The thread is still iterating: leaving run_system ends its loop.
    assert got == ["only"]


# -- what the bridge refuses ----------------------------------------------------------


async def test_blocking_calls_from_the_trio_thread_are_refused(db_path: str) -> None:
    refused: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        try:
            bridge.send("other", "from a handler")
        except RuntimeError as exc:
            refused.append(str(exc))

    async with actors.run_system(db_path, handler=handler) as system:
        bridge = system.bridge()
        calls: list[Callable[[], object]] = [
            lambda: bridge.send("s", 1),
            lambda: bridge.ask("s", 1),
            lambda: bridge.subscribe("s"),
        ]
        for call in calls:
            with pytest.raises(RuntimeError, match="trio thread"):
                call()
        assert system.statistics().sends == 0  # refused before anything was sent
        await system.send("s", "x")
        await system.drain()
        assert system.statistics().sends == 1
        assert bridge.statistics().calls == 0
    assert len(refused) == 1 and "await the System's methods" in refused[0]


async def test_calls_after_the_system_stopped_raise_system_closed_error(db_path: str) -> None:
    async with actors.run_system(db_path, handler=echo) as system:
        bridge = system.bridge()
        subscription = await trio.to_thread.run_sync(bridge.subscribe, "s")

    def blocking_calls() -> list[type[BaseException]]:
        raised = []
        for call in (
            lambda: bridge.send("s", 1),
            lambda: bridge.ask("s", 1),
            lambda: bridge.subscribe("s"),
        ):
            try:
                call()
            except actors.SystemClosedError as exc:
                raised.append(type(exc))
        return raised

    async def asyncio_calls() -> list[type[BaseException]]:
        raised = []
        for call in (lambda: bridge.send_async("s", 1), lambda: bridge.ask_async("s", 1)):
            try:
                await call()
            except actors.SystemClosedError as exc:
                raised.append(type(exc))
        return raised

    assert await trio.to_thread.run_sync(blocking_calls) == [actors.SystemClosedError] * 3
    assert (
        await trio.to_thread.run_sync(lambda: asyncio.run(asyncio_calls()))
        == [actors.SystemClosedError] * 2
    )
    assert await trio.to_thread.run_sync(list, subscription) == []


def test_calls_after_trio_run_returned_raise_system_closed_error(db_path: str) -> None:
    # A thread that outlives the whole trio run: calls fail cleanly, and a
    # blocking subscription's iteration just ends.
    kept: dict[str, Any] = {}

    async def main() -> None:
        async with actors.run_system(db_path, handler=echo) as system:
            bridge = system.bridge()
            kept["bridge"] = bridge
            kept["subscription"] = await trio.to_thread.run_sync(bridge.subscribe, "s")
            await trio.to_thread.run_sync(bridge.send, "s", 1)
            await system.drain()

    trio.run(main)
    bridge: actors.Bridge = kept["bridge"]
    for call in (
        lambda: bridge.send("s", 1),
        lambda: bridge.ask("s", 1),
        lambda: bridge.subscribe("s"),
        lambda: asyncio.run(bridge.send_async("s", 1)),
    ):
        with pytest.raises(actors.SystemClosedError):
            call()
    # The output published before the stop is still handed out, then it ends.
    assert [value["body"] for value in kept["subscription"]] == [1]


async def test_a_blocking_subscriber_gets_the_outputs_buffered_when_the_system_stopped(
    db_path: str,
) -> None:
    async with actors.run_system(db_path, handler=echo) as system:
        bridge = system.bridge()
        blocking = await trio.to_thread.run_sync(bridge.subscribe, "s")
        asynchronous = system.subscribe("s")
        await system.send_many([("s", n) for n in range(3)])
        await system.drain()
    # As for an async subscriber: what was published before the stop is read after it.
    assert [value["body"] async for value in asynchronous] == [0, 1, 2]
    assert [value["body"] for value in await trio.to_thread.run_sync(list, blocking)] == [0, 1, 2]


async def test_a_blocking_subscriber_reads_on_while_the_system_stops(db_path: str) -> None:
    # The handler is still emitting when the system begins to stop; its
    # subscriber, in a thread, reads on through the shutdown grace period, so
    # the handler finishes and its message is acknowledged.
    emitted_first = trio.Event()
    subscribed = trio.Event()
    go = threading.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        for n in range(5):
            await ctx.emit(n)
            emitted_first.set()

    got: list[int] = []
    async with trio.open_nursery() as nursery:
        async with actors.run_system(db_path, handler=handler, shutdown_timeout=5) as system:
            bridge = system.bridge()

            def consume() -> None:
                with bridge.subscribe("s", buffer=1) as values:
                    trio.from_thread.run_sync(subscribed.set)
                    go.wait()
                    got.extend(values)

            nursery.start_soon(trio.to_thread.run_sync, consume)
            await subscribed.wait()
            await system.send("s", "emit five")
            await emitted_first.wait()  # the buffer is full: the handler waits in emit
            go.set()  # the consumer starts reading once the system began to stop
            start = trio.current_time()
        stopped_after = trio.current_time() - start
        stats = system.statistics()
    assert got == [0, 1, 2, 3, 4]
    assert stats.processed == 1 and stats.pending == 0
    assert stopped_after < 5  # the handler finished: no wait for shutdown_timeout


async def test_iterating_a_blocking_subscription_in_the_trio_thread_is_refused(
    db_path: str,
) -> None:
    async with actors.run_system(db_path, handler=echo) as system:
        subscription = await trio.to_thread.run_sync(system.bridge().subscribe, "s")
        with pytest.raises(RuntimeError, match="trio thread"):
            next(subscription)
        subscription.close()
        await system.send("s", 1)
        await system.drain()
        assert system._sup.outputs.statistics().subscribers == 0  # closed from the trio thread


async def test_a_blocking_subscription_dropped_by_its_thread_releases_the_session(
    db_path: str,
) -> None:
    # The consumer thread breaks out of its loop while the session's actor
    # waits for room in the buffer: the subscription is garbage in that
    # thread, and must be closed in the trio thread, waking the actor.
    returning = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == 2:
            returning.set()
        return msg.body

    subscribed = trio.Event()
    got_one = trio.Event()
    drop = threading.Event()
    got: list[int] = []
    async with actors.run_system(db_path, handler=handler) as system:
        bridge = system.bridge()

        def consume() -> None:
            values = bridge.subscribe("s", buffer=1)
            trio.from_thread.run_sync(subscribed.set)
            for value in values:
                got.append(value)
                if len(got) == 1:
                    trio.from_thread.run_sync(got_one.set)
                    drop.wait()
                    break
            del values  # the only reference: the thread drops it here

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, consume)
            # Registered before anything is sent: no output can be missed.
            await subscribed.wait()
            await system.send_many([("s", n) for n in range(5)])
            await got_one.wait()
            await returning.wait()  # message 2 returned: its output waits for room
            await trio.testing.wait_all_tasks_blocked()
            assert system.busy_sessions() == ["s"]
            drop.set()
        with trio.fail_after(10):
            await system.drain()
        assert system._sup.outputs.statistics().subscribers == 0
    assert got == [0]


async def test_a_blocking_send_with_a_timeout_stops_waiting_and_the_send_goes_on(
    db_path: str,
) -> None:
    """``Bridge.send(timeout=...)`` bounds the caller's wait, not the send."""
    done: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        done.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        # Another connection holds the write lock: the batch cannot commit yet.
        lock = WriteLock(db_path)
        bridge = system.bridge()

        def call() -> None:
            try:
                with pytest.raises(concurrent.futures.TimeoutError):
                    bridge.send("s", 7, timeout=0.05)
            finally:
                lock.release()

        await trio.to_thread.run_sync(call)
        await system.drain()  # the send went on and committed after all
        assert system.statistics().processed == 1
    assert done == [7]
