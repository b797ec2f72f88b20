"""Dead letters: listing, retry_dead, abort."""

from __future__ import annotations

import pytest
import trio

import actors

NO_WAIT = actors.Backoff(initial=0.0, maximum=0.0, jitter=0.0)


async def test_retry_dead_requeues_with_fresh_attempts(
    db_path: str, autojump_clock: object
) -> None:
    healthy = False
    seen: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))
        if not healthy and msg.body.startswith("bad"):
            raise RuntimeError("downstream is down")

    async with actors.run_system(
        db_path, handler=handler, max_attempts=2, retry_backoff=NO_WAIT
    ) as system:
        bad1 = await system.send("a", "bad1")
        bad2 = await system.send("b", "bad2")
        await system.send("a", "good")
        await system.drain()
        assert {d.id for d in system.dead_letters()} == {bad1, bad2}
        assert [d.id for d in system.dead_letters("a")] == [bad1]
        assert len(system.dead_letters(limit=1)) == 1
        assert system.statistics().dead == 2
        healthy = True
        assert await system.retry_dead(bad1) == 1
        assert await system.retry_dead(bad1) == 0  # no longer dead
        await system.drain()
        assert [d.id for d in system.dead_letters()] == [bad2]
        assert await system.retry_dead() == 1
        await system.drain()
        assert system.dead_letters() == []
        assert system.statistics().dead == 0
    assert seen[-2:] == [("bad1", 1), ("bad2", 1)]


async def test_abort_pending_and_dead_but_not_in_flight(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()
    release = trio.Event()
    seen: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "block":
            entered.set()
            await release.wait()
        if msg.body == "dies":
            raise RuntimeError("no")
        seen.append(msg.body)

    async with actors.run_system(
        db_path, handler=handler, max_attempts=1, retry_backoff=NO_WAIT
    ) as system:
        blocker = await system.send("s", "block")
        doomed = await system.send("s", "never")
        await system.send("s", "kept")
        await entered.wait()
        with pytest.raises(ValueError, match="in flight"):
            await system.abort(blocker)
        assert await system.abort(doomed) is True
        assert await system.abort(doomed) is False
        assert await system.abort(10**9) is False
        release.set()
        dies = await system.send("s", "dies")
        await system.drain()
        assert [d.id for d in system.dead_letters()] == [dies]
        assert await system.abort(dies) is True
        assert system.dead_letters() == []
        assert system.statistics().dead == 0
    assert seen == ["block", "kept"]


async def test_abort_of_head_waiting_for_retry_unblocks_the_session(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[tuple[str, float]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "stuck":
            raise RuntimeError("always")
        seen.append((msg.body, trio.current_time()))

    backoff = actors.Backoff(initial=1000, jitter=0)
    async with actors.run_system(
        db_path, handler=handler, retry_backoff=backoff, idle_timeout=10
    ) as system:
        stuck = await system.send("s", "stuck")
        await system.send("s", "next")
        await trio.sleep(20)  # the actor left; the head waits for its retry
        assert not seen
        t0 = trio.current_time()
        assert await system.abort(stuck)
        await system.drain()
    assert seen[0][0] == "next" and seen[0][1] - t0 < 1
