"""Delivery: per-session FIFO, one handler per session, concurrency across sessions."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import trio
import trio.testing

import actors


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


async def test_fifo_per_session_and_one_at_a_time(db_path: str, autojump_clock: object) -> None:
    rng = random.Random(7)
    order: dict[str, list[int]] = defaultdict(list)
    running: set[str] = set()
    overlap: list[str] = []
    concurrency = 0
    peak = 0

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        nonlocal concurrency, peak
        if ctx.session_id in running:
            overlap.append(ctx.session_id)
        running.add(ctx.session_id)
        concurrency += 1
        peak = max(peak, concurrency)
        await trio.sleep(rng.random() / 100)
        order[ctx.session_id].append(msg.body)
        concurrency -= 1
        running.discard(ctx.session_id)

    async with actors.run_system(db_path, handler=handler) as system:

        async def producer(session: str) -> None:
            for i in range(25):
                await system.send(session, i)
                if rng.random() < 0.3:
                    await trio.sleep(rng.random() / 200)

        async with trio.open_nursery() as nursery:
            for s in range(40):
                nursery.start_soon(producer, f"session-{s}")
        await system.drain()
        assert system.statistics().processed == 1000

    assert not overlap
    assert peak > 1  # sessions ran concurrently
    assert len(order) == 40
    for session, bodies in order.items():
        assert bodies == list(range(25)), session


async def test_message_fields(db_path: str, autojump_clock: object) -> None:
    got: list[actors.Message] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        assert ctx.session_id == msg.session_id
        assert isinstance(ctx.system, actors.System)
        got.append(msg)

    async with actors.run_system(db_path, handler=handler) as system:
        sent_at = trio.current_time()
        message_id = await system.send("chat-1", {"text": "hi"})
        await trio.sleep(5)
        await system.drain()
    (msg,) = got
    assert msg.id == message_id
    assert msg.session_id == "chat-1"
    assert msg.body == {"text": "hi"}
    assert msg.attempt == 1
    # enqueued_at is epoch seconds at send time (on trio's clock).
    assert abs((msg.enqueued_at - system._clock.now()) - (sent_at - trio.current_time())) < 0.01


async def test_full_mailbox_never_blocks_the_router(db_path: str) -> None:
    """A slow session with a tiny mailbox: sends keep completing; work waits on disk."""
    release = trio.Event()
    fast_done = trio.Event()
    seen: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "slow":
            await release.wait()
        seen.append((ctx.session_id, msg.body))
        if ctx.session_id == "fast" and msg.body == 49:
            fast_done.set()

    async with actors.run_system(db_path, handler=handler, mailbox_size=1) as system:
        for i in range(50):
            await system.send("slow", i)  # returns although the slow actor is stuck
        for i in range(50):
            await system.send("fast", i)
        await fast_done.wait()  # the other session was not held up
        # Wait for the fast session's last ack: only the slow session's 50 remain.
        await system._sup.outstanding.wait_at_most(50)
        stats = system.statistics()
        assert stats.pending == 49 and stats.in_flight == 1
        release.set()
        await system.drain()
    assert [b for s, b in seen if s == "slow"] == list(range(50))
    assert [b for s, b in seen if s == "fast"] == list(range(50))


async def test_class_based_actor_lives_while_active(db_path: str, autojump_clock: object) -> None:
    events: list[tuple[str, str, int]] = []
    created = 0

    class Session(actors.Actor):
        def __init__(self) -> None:
            nonlocal created
            created += 1
            self.serial = created
            self.count = 0

        async def started(self, ctx: actors.Context) -> None:
            events.append(("started", ctx.session_id, self.serial))

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            self.count += 1
            events.append(("handle", ctx.session_id, self.count))

        async def stopped(self, ctx: actors.Context) -> None:
            events.append(("stopped", ctx.session_id, self.count))

    async with actors.run_system(db_path, handler=Session, idle_timeout=10) as system:
        for i in range(3):
            await system.send("a", i)
        await system.drain()
        assert system.is_active("a")
        await trio.sleep(11)  # idle: passivated
        assert not system.is_active("a")
        await system.send("a", 3)
        await system.drain()
    kinds = [(k, n) for k, _, n in events if k != "started"]
    assert kinds == [("handle", 1), ("handle", 2), ("handle", 3), ("stopped", 3),
                     ("handle", 1), ("stopped", 1)]  # fmt: skip
    starts = [n for k, _, n in events if k == "started"]
    assert len(starts) == 2 and starts[0] != starts[1]  # a fresh instance per activation


async def test_handler_validation() -> None:
    import pytest

    def sync_handler(ctx: object, msg: object) -> None:
        pass

    class NotAnActor:
        async def handle(self, ctx: object, msg: object) -> None:
            pass

    class NoHandle(actors.Actor):
        pass

    async def ok(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    for bad in (sync_handler, NotAnActor, NoHandle, ok.__name__, None):
        with pytest.raises(TypeError):
            async with actors.run_system("unused.db", handler=bad):
                pass

    class Good(actors.Actor):
        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            pass

    with pytest.raises(TypeError, match="not an instance"):
        async with actors.run_system("unused.db", handler=Good()):
            pass


async def test_unknown_option_is_named(db_path: str) -> None:
    import pytest

    async def ok(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    with pytest.raises(TypeError, match="max_atempts"):
        async with actors.run_system(db_path, handler=ok, max_atempts=3):
            pass
    with pytest.raises(ValueError, match="max_attempts"):
        async with actors.run_system(db_path, handler=ok, max_attempts=0):
            pass
    with pytest.raises(ValueError, match="durability"):
        async with actors.run_system(db_path, handler=ok, durability="sometimes"):
            pass


@pytest.mark.sqlite_only  # (PostgreSQL refuses the option: test_postgres.py)
async def test_durability_full(db_path: str) -> None:
    seen: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler, durability="full") as system:
        for i in range(10):
            await system.send("s", i)
        await system.drain()
    assert seen == list(range(10))
