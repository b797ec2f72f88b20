"""The supervisor on the fake store: slots and fair rotation, restart backoff, and its counts.

Unit tests of ``Supervisor`` without SQLite (tests/rig.py runs it on a
``MemoryStore``): who gets a slot when, how long a crashed actor waits
before its next incarnation, and that the counts the system reports
(processed, dead, outstanding, in flight) are what the store holds.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from memstore import MemoryStore
from rig import PhaseLog, Rig, running, settle

import actors
from actors._phases import Phase
from actors._policy import Backoff, RestartPolicy
from actors.store import MessageState


def most_alive(phases: PhaseLog) -> int:
    """The most actors alive at once (from their first phase change to ``left``)."""
    alive: set[tuple[str, int]] = set()
    most = 0
    for session_id, number, _, new, _ in phases.changes:
        if new is Phase.LEFT:
            alive.discard((session_id, number))
        else:
            alive.add((session_id, number))
        most = max(most, len(alive))
    return most


async def test_a_waiting_session_gets_the_slot_after_fair_share_messages(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    order: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        order.append(msg.body)

    async with running(handler, max_active=1, fair_share=2) as rig:
        yielding = rig.store.hold("ack")  # the ack a's actor flushes before it yields
        for body in ("a0", "a1", "a2", "a3", "a4"):
            rig.put("a", body)
        for body in ("b0", "b1", "b2"):
            rig.put("b", body)
        for body in ("c0", "c1", "c2"):
            rig.put("c", body)
        await yielding.reached()
        stats = rig.sup.statistics()
        assert (stats.active, stats.waiting) == (1, 2)  # b and c wait for the one slot
        assert order == ["a0", "a1"]
        yielding.release()
        await settle()
        assert rig.store.summary() == {}
        assert rig.sup.statistics().waiting == 0
    # Round robin, fair_share messages a turn; a session with less leaves early.
    assert order == ["a0", "a1", "b0", "b1", "c0", "c1", "a2", "a3", "b2", "c2", "a4"]
    assert most_alive(phases) == 1
    yielded = ["new", "starting", "claiming", "holding", "running", "holding", "running"]
    assert phases.actors("a")[0] == [*yielded, "acking", "stopping", "left"]
    # Its last message done, b leaves at once for those who wait (not even idle).
    assert phases.actors("b")[1] == [*yielded[:5], "stopping", "left"]


async def test_a_crashing_session_restarts_with_backoff_then_is_suspended(
    autojump_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        raise ValueError("always")

    policy = RestartPolicy(
        max_restarts=3,
        window=60,
        backoff=Backoff(initial=1, multiplier=2, maximum=10, jitter=0),
    )
    async with running(
        handler,
        restart_policy=policy,
        retry_backoff=Backoff(initial=0, jitter=0),
        max_attempts=100,
        idle_timeout=30,
    ) as rig:
        row = rig.put("s", "m")
        await trio.sleep(59)
        # Crashes at 0, 1, 3 and 7: restarts after 1, 2 and 4 s; the 4th crash
        # in the window suspends the session until the first leaves it (0 + 60),
        # longer than idle_timeout: the actor leaves, its head waits in the store.
        assert phases.times("s", Phase.STARTING) == [0, 1, 3, 7]
        [actor] = phases.actors("s")
        assert actor[-3:] == ["stopping", "failing", "left"]
        assert rig.actor("s") is None
        assert rig.store.summary() == {row.id: ("pending", 4)}
        assert row.not_before == pytest.approx(rig.clock.now() + 1)  # at 60
        assert (rig.sup.restart_count, rig.sup.failed_attempts) == (4, 4)
        await trio.sleep(1.5)  # the timer brings it back at 60
        assert rig.sup.timer.fired == 1
        assert phases.times("s", Phase.STARTING)[4] == 60
        assert len(phases.actors("s")) == 2


async def test_the_supervisor_counts_what_the_store_holds(
    still_clock: trio.testing.MockClock,
) -> None:
    blocked = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "poison":
            raise ValueError("never works")
        if msg.body == "flaky" and msg.attempt == 1:
            raise ValueError("works the second time")
        if msg.body == "slow":
            await blocked.wait()

    def consistent(rig: Rig, *, processed: int) -> None:
        sup, store = rig.sup, rig.store
        in_store = store.count(MessageState.PENDING, MessageState.IN_FLIGHT)
        assert sup.outstanding.value == in_store
        assert sup.dead == store.count(MessageState.DEAD)
        assert sup.in_flight() == sum(
            1 for s in sup.live_sessions() if (a := rig.actor(s)) and a.in_flight is not None
        )
        assert sup.in_flight() <= store.count(MessageState.IN_FLIGHT)
        assert sup.processed == processed

    retry = Backoff(initial=10, multiplier=1, jitter=0)
    options: dict[str, Any] = {"retry_backoff": retry, "max_attempts": 2}
    async with running(handler, MemoryStore(), **options) as rig:
        for body in ("ok1", "ok2", "ok3"):
            await rig.send("ok", body)
        await rig.send("bad", "poison")
        await rig.send("flaky", "flaky")
        await rig.send("slow", "slow")
        await rig.send("later", "ok", delay=100)
        await settle()
        consistent(rig, processed=3)
        assert rig.sup.in_flight() == 1  # "slow"
        still_clock.jump(10)  # the retries
        await settle()
        consistent(rig, processed=4)
        assert rig.store.count(MessageState.DEAD) == 1
        blocked.set()
        await settle()
        consistent(rig, processed=5)
        still_clock.jump(90)  # "later" is due
        await settle()
        consistent(rig, processed=6)
        assert rig.sup.outstanding.value == 0
        assert (rig.sup.failed_attempts, rig.sup.dead_lettered) == (3, 1)
        await rig.drain()
