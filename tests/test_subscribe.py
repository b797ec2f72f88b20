"""Live streams: a session's outputs (``subscribe``) and status events (``events``).

``subscribe`` applies backpressure: while a subscriber's buffer is full, the
session's actor waits, so its next message does not start. These tests prove
it on the MockClock with ``wait_all_tasks_blocked`` (SQLite runs inline, so
"every task is blocked" means the system has gone as far as it can) and
counts of handler starts, not with sleeps. ``events`` never slows the
system: a full buffer drops events and counts them.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import trio
import trio.testing
from helpers import drain_nowait

import actors
from actors.testing import fast_options


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


class Boom(Exception):
    pass


# -- outputs --------------------------------------------------------------------


async def test_subscriber_receives_returned_and_emitted_values_in_order(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        await ctx.emit(("emit", msg.body, 0))
        await trio.sleep(1)
        await ctx.emit(("emit", msg.body, 1))
        if msg.body == 1:
            return None  # None is not an output
        return ("return", msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "before anyone listened")
        await system.drain()
        subscription = system.subscribe("s")
        other = system.subscribe("s", buffer=100)
        await system.send_many([("s", n) for n in range(3)] + [("elsewhere", 9)])
        got = []
        async for value in subscription:
            got.append(value)
            if len(got) == 8:
                break
        await system.drain()
        assert drain_nowait(other) == got  # every subscriber gets everything
    assert got == [
        ("emit", 0, 0),
        ("emit", 0, 1),
        ("return", 0),
        ("emit", 1, 0),
        ("emit", 1, 1),
        ("emit", 2, 0),
        ("emit", 2, 1),
        ("return", 2),
    ]


async def test_backpressure_holds_the_next_message_until_the_subscriber_reads(
    db_path: str, autojump_clock: object
) -> None:
    starts: dict[str, list[int]] = {"slow": [], "free": []}

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        starts[ctx.session_id].append(msg.body)
        return msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        subscription = system.subscribe("slow", buffer=1)
        await system.send_many([("slow", n) for n in range(5)])
        await trio.testing.wait_all_tasks_blocked()
        # 0's output fills the buffer; 1's waits in its actor, still in flight:
        # message 2 does not start.
        assert starts["slow"] == [0, 1]
        assert system.busy_sessions() == ["slow"]
        assert subscription.statistics().buffered == 1
        # Other sessions are not held back.
        await system.send_many([("free", n) for n in range(5)])
        await trio.testing.wait_all_tasks_blocked()
        assert starts["free"] == [0, 1, 2, 3, 4]
        assert starts["slow"] == [0, 1]
        # Each value read lets exactly one more message start.
        for n in range(3):
            assert subscription.receive_nowait() == n
            await trio.testing.wait_all_tasks_blocked()
            assert starts["slow"] == list(range(n + 3))
        assert [await subscription.__anext__() for _ in range(2)] == [3, 4]
        await system.drain()
        assert system.statistics().processed == 10


async def test_backpressure_holds_a_handler_in_emit(db_path: str, autojump_clock: object) -> None:
    emitted: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        for n in range(4):
            await ctx.emit(n)
            emitted.append(n)

    async with actors.run_system(db_path, handler=handler) as system:
        subscription = system.subscribe("s", buffer=1)
        await system.send("s", "go")
        await trio.testing.wait_all_tasks_blocked()
        assert emitted == [0]  # the second emit waits for room
        assert subscription.receive_nowait() == 0
        await trio.testing.wait_all_tasks_blocked()
        assert emitted == [0, 1]
        assert [await subscription.__anext__() for _ in range(3)] == [1, 2, 3]
        await system.drain()
    assert emitted == [0, 1, 2, 3]


async def test_emit_without_subscribers_returns_at_once(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        for n in range(1000):
            await ctx.emit(n)
        return "ignored"

    async with actors.run_system(db_path, handler=handler) as system:
        start = trio.current_time()
        await system.send("s", 1)
        await system.drain()
        assert trio.current_time() == start
        assert system._sup.outputs.statistics().published == 0


async def test_a_dropped_subscription_releases_the_session(
    db_path: str, autojump_clock: object
) -> None:
    starts: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        starts.append(msg.body)
        return msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        subscription = system.subscribe("s", buffer=1)
        await system.send_many([("s", n) for n in range(6)])
        await trio.testing.wait_all_tasks_blocked()
        assert starts == [0, 1]  # held by the subscriber
        async for value in subscription:
            assert value == 0
            break
        del subscription  # no close(): dropping it is enough
        await system.drain()
        assert starts == list(range(6))
        assert system._sup.outputs.statistics().subscribers == 0


async def test_a_subscription_abandoned_in_a_finished_frame_releases_the_session(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return msg.body

    async def first_output(system: actors.System) -> Any:
        async for value in system.subscribe("s", buffer=1):
            return value  # the subscription is garbage when this frame ends
        return None

    async with actors.run_system(db_path, handler=handler) as system:
        async with trio.open_nursery() as nursery:
            got: list[Any] = []

            async def peek() -> None:
                got.append(await first_output(system))

            nursery.start_soon(peek)
            await trio.testing.wait_all_tasks_blocked()
            await system.send_many([("s", n) for n in range(5)])
        gc.collect()
        await system.drain()
        assert got == [0]
        assert system.statistics().processed == 5


async def test_closing_a_subscription_ends_it_and_unregisters_it(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        async with system.subscribe("s", buffer=3) as subscription:
            await system.send("s", 1)
            await system.drain()
            assert subscription.statistics() == actors.SubscriptionStatistics(
                buffered=1, buffer_size=3, dropped=0, closed=False
            )
            assert system._sup.outputs.statistics().subscribers == 1
        assert subscription.statistics().closed
        assert system._sup.outputs.statistics().subscribers == 0
        assert [value async for value in subscription] == []
        other = system.subscribe("s")
        await other.aclose()
        await other.aclose()  # idempotent
        await system.send("s", 2)  # nobody listens: no wait
        await system.drain()


async def test_outputs_repeat_when_a_message_is_redelivered(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        await ctx.emit(("working on", msg.id, msg.attempt))
        if msg.attempt == 1:
            entered.set()
            await trio.sleep_forever()
        return ("done", msg.id)

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        subscription = system.subscribe("s")
        message_id = await system.send("s", 1)
        await entered.wait()
        system.kill("s")
        await system.drain()
        assert drain_nowait(subscription) == [
            ("working on", message_id, 1),
            ("working on", message_id, 2),
            ("done", message_id),
        ]


async def test_subscription_ends_when_the_system_stops(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return msg.body

    got: list[Any] = []
    ended = trio.Event()

    async def consume(subscription: actors.Subscription[Any]) -> None:
        async for value in subscription:
            got.append(value)
        ended.set()

    async with trio.open_nursery() as nursery:
        async with actors.run_system(db_path, handler=handler) as system:
            nursery.start_soon(consume, system.subscribe("s"))
            await system.send_many([("s", 1), ("s", 2)])
            await system.drain()
            await trio.testing.wait_all_tasks_blocked()
            assert not ended.is_set()
        await ended.wait()
        # A subscription made after the stop ends at once.
        assert [value async for value in system.subscribe("s")] == []
    assert got == [1, 2]


@pytest.mark.parametrize(
    ("buffer", "error"),
    [(0, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError), ("2", TypeError)],
)
async def test_subscribe_and_events_validate_the_buffer(
    db_path: str, buffer: object, error: type[Exception]
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(error, match="buffer"):
            system.subscribe("s", buffer=buffer)  # type: ignore[arg-type]
        with pytest.raises(error, match="buffer"):
            system.events(buffer=buffer)  # type: ignore[arg-type]


@pytest.mark.parametrize(("session", "error"), [(42, TypeError), ("", ValueError)])
async def test_subscribe_validates_the_session(
    db_path: str, session: object, error: type[Exception]
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(error):
            system.subscribe(session)  # type: ignore[arg-type]


# -- status events --------------------------------------------------------------


async def test_events_report_starts_restarts_dead_letters_and_stops(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "always fails" or (msg.body == "fails once" and msg.attempt == 1):
            raise Boom(msg.body)

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=2, idle_timeout=5)
    ) as system:
        events = system.events()
        await system.send("ok", 1)
        await system.send("flaky", "fails once")
        dead_id = await system.send("doomed", "always fails")
        await system.drain()
        await trio.sleep(10)  # every actor passivates
        seen = drain_nowait(events)
        now = system._clock.now()
    by_kind: dict[str, list[actors.StatusEvent]] = {}
    for event in seen:
        by_kind.setdefault(event.kind, []).append(event)
        assert now - 60 < event.at <= now  # seconds since the epoch
    # A start, and one after each crash (doomed's last crash dead-lettered it).
    assert sorted(e.session_id for e in by_kind["actor_started"]) == [
        "doomed",
        "doomed",
        "doomed",
        "flaky",
        "flaky",
        "ok",
    ]
    restarted = by_kind["actor_restarted"]
    assert sorted(e.session_id for e in restarted) == ["doomed", "doomed", "flaky"]
    assert all("Boom" in e.detail and e.delay is not None for e in restarted)
    (dead,) = by_kind["dead_lettered"]
    assert dead.session_id == "doomed" and dead.message_id == dead_id
    assert "always fails" in dead.detail
    stopped = by_kind["actor_stopped"]
    assert sorted(e.session_id for e in stopped) == ["doomed", "flaky", "ok"]
    assert {e.detail for e in stopped} == {"idle"}
    assert "session_suspended" not in by_kind


async def test_events_report_a_suspended_session(db_path: str, autojump_clock: object) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.attempt <= 2:
            raise Boom("crash")

    policy = actors.RestartPolicy(
        max_restarts=1, window=100.0, backoff=actors.Backoff(initial=1, jitter=0)
    )
    async with actors.run_system(
        db_path,
        handler=handler,
        restart_policy=policy,
        retry_backoff=actors.Backoff(initial=1, jitter=0),
    ) as system:
        events = system.events()
        await system.send("s", 1)
        await system.drain()
        seen = [e for e in drain_nowait(events) if e.kind != "backlog"]
    suspended = [e for e in seen if e.kind == "session_suspended"]
    assert len(suspended) == 1
    assert suspended[0].session_id == "s"
    assert suspended[0].delay == pytest.approx(100.0, abs=2)
    assert [e.kind for e in seen].count("actor_restarted") == 2


async def test_events_report_the_backlog_every_status_interval(
    db_path: str, autojump_clock: object
) -> None:
    release = trio.Event()
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        entered.set()
        await release.wait()

    async with actors.run_system(db_path, handler=handler, status_interval=2) as system:
        await system.send_many([("s", n) for n in range(3)])
        await entered.wait()
        events = system.events()
        await trio.sleep(5)
        backlog = [e for e in drain_nowait(events) if e.kind == "backlog"]
        release.set()
        await system.drain()
    assert len(backlog) == 3  # at 0, 2 and 4 s
    assert all((e.session_id, e.pending, e.in_flight, e.dead) == (None, 2, 1, 0) for e in backlog)
    assert backlog[1].at - backlog[0].at == pytest.approx(2)


async def test_a_full_events_buffer_drops_and_counts_without_slowing_the_system(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(db_path, handler=handler) as system:
        events = system.events(buffer=2)
        await system.send_many([(f"s{n}", n) for n in range(10)])
        await system.drain()  # nobody reads the events: the system goes on
        kept = drain_nowait(events)
        stats = events.statistics()
        dropped = events.dropped
        emitted = system._sup.events.statistics().emitted
    assert len(kept) == 2
    assert [e.session_id for e in kept if e.kind == "actor_started"]  # the first ones, kept
    assert emitted >= 10  # ten actors started (and a backlog report)
    assert stats.dropped == dropped == emitted - 2
    assert stats.buffer_size == 2 and stats.buffered == 0


async def test_events_end_when_the_system_stops(db_path: str, autojump_clock: object) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    kinds: list[str] = []

    async def consume(events: actors.Subscription[actors.StatusEvent]) -> None:
        async for event in events:
            kinds.append(event.kind)

    async with (
        trio.open_nursery() as nursery,
        actors.run_system(db_path, handler=handler) as system,
    ):
        nursery.start_soon(consume, system.events())
        await system.send("s", 1)
        await system.drain()
    # The nursery ended: the loop did. The last events are the actor leaving.
    assert "actor_started" in kinds and kinds[-1] == "actor_stopped"


async def test_an_abandoned_events_subscription_is_unregistered(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(db_path, handler=handler) as system:
        events = system.events(buffer=1)
        await system.send("s", 1)
        await system.drain()
        assert system._sup.events.statistics().subscribers == 1
        del events  # never closed: dropping it is enough, as for subscribe()
        gc.collect()
        assert system._sup.events.statistics().subscribers == 0
        assert not system._sup.events.active  # nobody listens: no events are built


async def test_waiting_in_emit_counts_toward_handler_timeout_waiting_after_return_does_not(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == "emits":
            await ctx.emit(1)
            await ctx.emit(2)  # no room: waits in the handler
        return "returned"  # for "returns": waits after the handler, for room

    async with actors.run_system(
        db_path, handler=handler, handler_timeout=5, max_attempts=1
    ) as system:
        emitting = system.subscribe("emitter", buffer=1)
        returning = system.subscribe("returner", buffer=1)
        await system.send("emitter", "emits")
        await system.send_many([("returner", "returns"), ("returner", "returns")])
        await trio.sleep(100)
        (letter,) = system.dead_letters()
        assert letter.session_id == "emitter" and "HandlerTimeoutError" in letter.last_error
        assert system.busy_sessions() == ["returner"]  # held, not timed out
        assert system.statistics().failed_attempts == 1
        assert returning.receive_nowait() == "returned"
        await system.drain()
        assert drain_nowait(emitting) == [1]
