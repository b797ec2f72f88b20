"""statistics() on every stateful part, and that the counts agree with what happened."""

from __future__ import annotations

import math

import pytest
import trio

import actors


async def test_component_statistics_follow_the_work(db_path: str, autojump_clock: object) -> None:
    release = trio.Event()
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "block":
            entered.set()
            await release.wait()

    async with actors.run_system(db_path, handler=handler, idle_timeout=50) as system:
        await system.send("a", "block")
        await system.send("a", "after")
        await system.send("b", "later", delay=30)
        await entered.wait()

        router = system._router.statistics()
        assert (router.sends, router.open_batch, router.closed) == (3, 0, False)
        assert router.batches >= 1

        sup = system._sup.statistics()
        assert (sup.active, sup.busy, sup.reserved, sup.waiting) == (1, 1, 0, 0)
        assert not sup.stopping and sup.isolating is None

        actor = system._sup._actors["a"].statistics()
        assert actor.session_id == "a" and actor.handler_running
        assert actor.in_flight is not None
        assert actor.handed == 1  # "after": claimed on delivery, queued behind "block"
        assert not actor.parked

        timer = system._timer.statistics()
        assert timer.fired == 0
        assert math.isfinite(timer.next_deadline)  # the delayed message

        store = system._store.statistics()
        assert store.transactions >= 2 and store.operations >= store.transactions

        release.set()
        await system.drain()
        assert system._timer.statistics().fired == 1
        sup = system._sup.statistics()
        assert sup.busy == 0 and sup.active == 2
        stats = system.statistics()
        assert (stats.processed, stats.pending, stats.in_flight, stats.sends) == (3, 0, 0, 3)
    assert system._router.statistics().closed


def test_the_warning_limiter_counts_what_it_let_through_and_held_back() -> None:
    from actors._failure import WarningLimiter

    limiter = WarningLimiter(interval=10.0, burst=2)
    assert limiter.allow("ValueError", 0.0) == 0
    assert limiter.allow("ValueError", 1.0) is None  # the same kind in the window
    assert limiter.allow("KeyError", 2.0) == 1  # says one was held back before it
    assert limiter.allow("OSError", 3.0) is None  # the burst is spent
    stats = limiter.statistics()
    assert (stats.allowed, stats.held_back, stats.suppressed) == (2, 2, 1)
    assert limiter.allow("OSError", 10.0) == 1  # a new window
    assert limiter.statistics().suppressed == 0


def test_the_database_lock_counts_its_refusals(tmp_path: object) -> None:
    import os

    from actors._lock import DatabaseLock

    path = os.path.join(str(tmp_path), "app.db")
    first, second = DatabaseLock(path), DatabaseLock(path)
    first.acquire()
    try:
        assert first.statistics().held and first.statistics().identity is not None
        for _ in range(2):
            with pytest.raises(actors.DatabaseInUseError):
                second.acquire()
        stats = second.statistics()
        assert (stats.held, stats.identity, stats.refusals) == (False, None, 2)
    finally:
        second.release()
        first.release()
    assert first.statistics().held is False
