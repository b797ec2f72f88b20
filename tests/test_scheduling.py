"""max_active: a cap on live actors, fair rotation, no starvation, bounded memory."""

from __future__ import annotations

import trio

import actors


async def test_max_active_caps_live_actors(db_path: str, autojump_clock: object) -> None:
    live = 0
    peak = 0

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await trio.sleep(0.01)
        live -= 1

    async with actors.run_system(db_path, handler=handler, max_active=3) as system:
        for i in range(60):
            await system.send(f"s{i % 20}", i)
            assert system.statistics().active_actors <= 3
        await system.drain()
        assert system.statistics().processed == 60
    assert peak == 3


async def test_busy_session_cannot_starve_the_others(db_path: str, autojump_clock: object) -> None:
    finished_at: dict[str, float] = {}

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep(1)
        finished_at[ctx.session_id] = trio.current_time()

    async with actors.run_system(db_path, handler=handler, max_active=1, fair_share=5) as system:
        start = trio.current_time()
        await system.send_many([("busy", i) for i in range(1000)])
        for i in range(5):
            await system.send(f"quiet-{i}", i)
        await system.drain()
    # Each quiet session waited for at most a few turns of 5 busy messages,
    # not for the 1000 busy ones.
    for i in range(5):
        assert finished_at[f"quiet-{i}"] - start < 60
    assert finished_at["busy"] - start >= 1000


async def test_idle_actor_leaves_at_once_for_a_waiting_session(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[tuple[str, float]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((ctx.session_id, trio.current_time()))

    async with actors.run_system(
        db_path, handler=handler, max_active=1, idle_timeout=1000
    ) as system:
        await system.send("a", 1)
        await system.drain()
        assert system.is_active("a")
        t0 = trio.current_time()
        await system.send("b", 1)
        await system.drain()
        assert not system.is_active("a")
    assert seen[-1][0] == "b" and seen[-1][1] - t0 < 1


async def test_long_retry_wait_frees_the_slot_and_timer_brings_it_back(
    db_path: str, autojump_clock: object
) -> None:
    attempts: list[tuple[str, int, float]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        attempts.append((ctx.session_id, msg.attempt, trio.current_time()))
        if ctx.session_id == "flaky" and msg.attempt == 1:
            raise RuntimeError("try later")

    backoff = actors.Backoff(initial=100, maximum=1000, jitter=0)
    async with actors.run_system(
        db_path, handler=handler, retry_backoff=backoff, idle_timeout=10, max_active=1
    ) as system:
        await system.send("flaky", 1)
        await system.send("other", 1)
        await system.drain()
    by = {(s, a): t for s, a, t in attempts}
    assert by[("other", 1)] < 50  # ran while flaky waited, though max_active=1
    assert by[("flaky", 2)] - by[("flaky", 1)] >= 100


async def test_many_sessions_beyond_the_waiting_queue_are_found_in_the_database(
    db_path: str, autojump_clock: object, monkeypatch: object
) -> None:
    import actors._line as line_module

    monkeypatch.setattr(line_module, "WAITING_LIMIT", 10)  # type: ignore[attr-defined]
    seen: dict[str, list[int]] = {}

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.setdefault(ctx.session_id, []).append(msg.body)
        await trio.sleep(0.01)

    async with actors.run_system(db_path, handler=handler, max_active=4) as system:
        await system.send_many([(f"s{i:03}", j) for j in range(3) for i in range(200)])
        peak_waiting = 0
        while system.statistics().pending:
            peak_waiting = max(peak_waiting, system.statistics().waiting_sessions)
            assert system.statistics().active_actors <= 4
            await trio.sleep(0.05)
        await system.drain()
    assert peak_waiting <= 10  # memory bounded; the rest waited on disk
    assert len(seen) == 200
    assert all(v == [0, 1, 2] for v in seen.values())


async def test_dead_letter_while_others_wait_does_not_strand_the_session(
    db_path: str, autojump_clock: object
) -> None:
    done: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "poison":
            raise RuntimeError("poison")
        done.append(msg.body)

    async with actors.run_system(
        db_path, handler=handler, max_active=1, max_attempts=1, idle_timeout=0.2
    ) as system:
        await system.send_many([("a", "poison"), ("a", "after"), ("b", "x")])
        with trio.fail_after(100):
            await system.drain()
    assert sorted(done) == ["after", "x"]


async def test_watchdog_memory_follows_active_actors_not_activations(
    db_path: str, autojump_clock: object
) -> None:
    """Thousands of short activations within one handler_timeout: the watchdog
    must not hold on to every actor that ever ran (memory follows active actors)."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(
        db_path, handler=handler, max_active=10, handler_timeout=3600
    ) as system:
        for i in range(3000):
            await system.send(f"s{i}", i)  # a new session each time: activations galore
        await system.drain()
        watched = system._sup.watchdog.statistics().watched
        assert system.statistics().processed == 3000
    assert watched <= 2 * 10 + 64
