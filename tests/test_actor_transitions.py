"""The session actor's state machine, transition by transition, on the fake store.

Each test runs a supervisor and its actors on a ``MemoryStore`` (tests/rig.py,
tests/memstore.py) under a still MockClock (time moves only when the test
jumps it), puts the actor where a rare interleaving happens (a store
operation held uncommitted, an action run as the actor enters a phase), and
asserts the exact phases each actor went through and what the store holds
after: attempts counted or given back, messages pending, in flight, dead or
gone. Phases are ``Phase`` values; a list per actor, from ``new``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from memstore import IN_FLIGHT, MemoryStore
from rig import PhaseLog, Rig, running, settle

import actors
from actors._actor import SessionActor
from actors._errors import StoreError
from actors._phases import Phase
from actors._policy import Backoff, RestartPolicy
from actors._reply import Reply
from actors._watchdog import IdleWatch

# Retries and restarts at once: the phases, not the waits, are under test.
AT_ONCE: dict[str, Any] = {
    "retry_backoff": Backoff(initial=0, jitter=0),
    "restart_policy": RestartPolicy(backoff=Backoff(initial=0, jitter=0)),
}
TIMER_OPS = {"next_due", "collect_due", "sessions_with_work"}


def walk(*stretches: str) -> list[str]:
    """Phase names, given as space-separated stretches of one actor's way."""
    return [phase for stretch in stretches for phase in stretch.split()]


def ops(store: MemoryStore) -> list[str]:
    """The operations that committed, in order, the timer's and the line's reads aside."""
    return [name for name in store.committed if name not in TIMER_OPS]


def live(rig: Rig, session_id: str = "s") -> SessionActor:
    actor = rig.actor(session_id)
    assert actor is not None
    return actor


class Seen:
    """A handler that records (body, attempt) of each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int]] = []

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.calls.append((msg.body, msg.attempt))


# -- a message's way --------------------------------------------------------------


async def test_a_message_is_claimed_run_and_acked_then_the_idle_actor_leaves(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler, idle_timeout=5) as rig:
        row = rig.put("s", "hello")
        await settle()
        assert phases.actors("s") == [["new", "starting", "claiming", "holding", "running", "idle"]]
        assert rig.store.summary() == {}  # acked: the row is gone
        assert ops(rig.store) == ["claim_next", "ack_soon"]
        assert rig.store.marks.started == [row.id]  # marked before its handler started
        assert (rig.sup.processed, rig.sup.outstanding.value, rig.sup.busy.value) == (1, 0, 0)

        still_clock.jump(5)  # idle_timeout: passivation
        await settle()
        assert phases.path("s")[-3:] == ["idle", "stopping", "left"]
        assert rig.actor("s") is None
        assert ops(rig.store)[-1] == "after_commits"  # the start-table slot, after its acks
        assert rig.store.marks.in_use == 0
    assert handler.calls == [("hello", 1)]


async def test_one_claim_takes_the_fresh_messages_behind_the_head(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    store = MemoryStore()
    for body in (1, 2, 3):
        store.put("s", body)
    handler = Seen()
    async with running(handler, store) as rig:
        await settle()
        assert phases.actors("s") == [
            # the 2nd and 3rd from the handed queue
            walk("new starting claiming", "holding running " * 3, "idle")
        ]
        # One claim; each ack submitted as the next message starts (pipelined).
        assert ops(rig.store) == ["claim_next", "ack_soon", "ack_soon", "ack_soon"]
        assert rig.store.summary() == {}
    assert handler.calls == [(1, 1), (2, 1), (3, 1)]


async def test_a_message_sent_to_an_idle_caught_up_actor_is_handed_claimed(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler) as rig:
        rig.put("s", 0)
        await settle()
        phases.clear()
        held = rig.store.hold("ack_soon")  # (keeps the handed row in view)
        msg_id = await rig.send("s", 1)
        await held.reached()
        # Inserted claimed (attempt 1) and run with no claim of the actor's own.
        assert phases.actors("s") == [["idle", "holding", "running", "idle"]]
        assert rig.store.summary() == {msg_id: ("in flight", 1)}
        assert rig.router.handoffs == 1
        held.release()
        await settle()
        assert rig.store.summary() == {}
        assert ops(rig.store) == ["claim_next", "ack_soon", "append", "ack_soon"]
    assert handler.calls == [(0, 1), (1, 1)]


# -- kills --------------------------------------------------------------------------


async def test_a_kill_while_claiming_lets_the_claim_commit_and_gives_the_attempt_back(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler, **AT_ONCE) as rig:
        held = rig.store.hold("claim_next")
        row = rig.put("s", "m")
        await held.reached()
        assert phases.actors("s") == [["new", "starting", "claiming"]]
        assert live(rig).kill()
        await settle()
        # Not cancellable: the actor still waits for its claim.
        assert phases.actors("s") == [["new", "starting", "claiming"]]
        assert rig.store.summary() == {row.id: ("pending", 0)}

        held.release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding",
                # the claim committed (attempt 1); the kill lands before the handler:
                "failing backoff",
                "starting claiming holding running idle",
            )
        ]
        # Claimed, given back (attempt 0 again), claimed again: attempt 1.
        assert ops(rig.store) == ["claim_next", "release", "claim_next", "ack_soon"]
        assert rig.store.summary() == {}
        assert (rig.sup.restart_count, rig.sup.failed_attempts) == (1, 0)
    assert handler.calls == [("m", 1)]


async def test_a_kill_while_claiming_still_commits_the_ack_the_claim_carries(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    calls: list[tuple[Any, int]] = []
    held: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt))
        if msg.body == 1:
            rig.put("s", 2)  # announced while 1 runs: the next claim carries 1's ack
            held.append(rig.store.hold("claim_next"))

    async with running(handler, **AT_ONCE) as rig:
        first = rig.put("s", 1)
        await settle()
        await held[0].reached()
        second = first.id + 1
        assert rig.store.summary() == {first.id: ("in flight", 1), second: ("pending", 0)}
        assert live(rig).kill()
        held[0].release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running claiming holding",
                "failing backoff",
                "starting claiming holding running idle",
            )
        ]
        assert rig.store.summary() == {}
        assert rig.sup.processed == 2
    # 1 was acked by the claim the kill interrupted: it never runs again.
    assert calls == [(1, 1), (2, 1)]


async def test_a_kill_while_holding_gives_the_attempt_back(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler, **AT_ONCE) as rig:
        phases.when(Phase.HOLDING, lambda actor: actor.kill())
        restart = rig.store.hold("claim_next", nth=2)  # the restart's claim
        row = rig.put("s", "m")
        await restart.reached()
        assert rig.store.summary() == {row.id: ("pending", 0)}  # released, uncounted
        restart.release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding",
                "failing backoff",
                "starting claiming holding running idle",
            )
        ]
        assert rig.store.marks.started == [row.id]  # one handler start
    assert handler.calls == [("m", 1)]


async def test_a_kill_while_holding_a_bulk_claimed_message_keeps_the_ack_before_it(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    """The kill lands as the 2nd message of a bulk claim is taken: the 1st one's ack
    was submitted as it was taken, and commits; the 2nd and 3rd get their attempts back."""
    store = MemoryStore()
    ids = [store.put("s", body).id for body in (1, 2, 3)]
    handler = Seen()
    again = store.hold("claim_next", nth=2)
    async with running(handler, store, **AT_ONCE) as rig:
        phases.when(Phase.HOLDING, lambda actor: actor.kill(), nth=2)
        await again.reached()
        assert rig.store.summary() == {ids[1]: ("pending", 0), ids[2]: ("pending", 0)}
        assert ops(rig.store) == ["claim_next", "ack_soon", "release_many", "release"]
        again.release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running holding",
                # 3 (handed) given back, then 2 (held, not started)
                "failing backoff",
                "starting claiming holding running holding running idle",
            )
        ]
        assert rig.store.summary() == {}
    assert handler.calls == [(1, 1), (2, 1), (3, 1)]


async def test_a_kill_while_running_keeps_the_attempt_counted(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    calls: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append(msg.attempt)
        if msg.attempt == 1:
            await trio.sleep_forever()

    async with running(handler, **AT_ONCE) as rig:
        row = rig.put("s", "m")
        await settle()
        restart = rig.store.hold("claim_next")
        assert live(rig).kill()
        await restart.reached()
        # Failed back to pending with its attempt counted, and why.
        assert rig.store.summary() == {row.id: ("pending", 1)}
        assert "ActorKilledError" in (row.last_error or "")
        restart.release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running",
                "failing backoff",  # (no stopped(): not after a kill)
                "starting claiming holding running idle",
            )
        ]
        assert ops(rig.store) == ["claim_next", "fail", "claim_next", "ack_soon"]
        assert (rig.sup.restart_count, rig.sup.failed_attempts) == (1, 1)
    assert calls == [1, 2]


async def test_a_kill_while_acking_for_an_ask_lets_the_ack_commit(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    """An ask's message is acked before its answer (acking): a kill then still
    sees the ack committed and the asker answered; the message never runs again."""
    handler_calls: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> str:
        handler_calls.append(msg.attempt)
        return "result"

    async with running(handler, **AT_ONCE) as rig:
        held = rig.store.hold("ack")
        row = rig.store.put("s", "question")
        reply = Reply()
        rig.sup.replies[row.id] = reply
        rig.sup.outstanding.add(1)
        rig.sup.ensure("s", row.id)
        await held.reached()
        assert phases.actors("s") == [
            ["new", "starting", "claiming", "holding", "running", "acking"]
        ]
        assert live(rig).kill()
        await settle()
        assert rig.store.summary() == {row.id: ("in flight", 1)}  # the ack waits
        held.release()
        await settle()
        assert reply.value == "result"
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running acking",
                "idle failing backoff",  # the kill lands at the idle wait
                "starting claiming idle",
            )
        ]
        assert rig.store.summary() == {}
        assert (rig.sup.processed, rig.sup.restart_count, rig.sup.failed_attempts) == (1, 1, 0)
    assert handler_calls == [1]


async def test_a_kill_while_acking_before_a_yield_ends_nothing(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    """The actor used its fair share and acks before it yields its slot; a kill then
    has nothing left to interrupt (no checkpoint before the incarnation ends): the
    ack commits and the actor yields as it would have (kill() said True, no restart)."""
    store = MemoryStore()
    store.put("a", 1)
    store.put("a", 2)
    store.put("b", 3)
    held = store.hold("ack")
    handler = Seen()
    async with running(handler, store, max_active=1, fair_share=1, **AT_ONCE) as rig:
        await held.reached()
        assert live(rig, "a").kill()
        held.release()
        await settle()
        assert phases.actors("a") == [
            ["new", "starting", "claiming", "holding", "running", "acking", "stopping", "left"],
            ["new", "starting", "claiming", "holding", "running", "idle"],
        ]
        assert phases.actors("b") == [
            ["new", "starting", "claiming", "holding", "running", "stopping", "left"]
        ]
        assert rig.sup.restart_count == 0
        assert rig.store.summary() == {}
    assert handler.calls == [(1, 1), (3, 1), (2, 1)]


async def test_a_restart_while_the_previous_ack_commits_does_not_run_it_again(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    """1's ack is pipelined (an ack box, held) while 2 runs and fails: the failure
    is recorded after the ack (submission order), and the restart runs 2 only."""
    store = MemoryStore()
    first, second = store.put("s", 1).id, store.put("s", 2).id
    calls: list[tuple[Any, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt))
        if msg.body == 2 and msg.attempt == 1:
            raise ValueError("2 fails once")

    box = store.hold("ack_soon")
    async with running(handler, store, **AT_ONCE) as rig:
        await box.reached()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running holding running",
                "stopping failing",  # its fail waits behind the ack box
            )
        ]
        assert rig.store.summary() == {first: ("in flight", 1), second: ("in flight", 1)}
        assert rig.store.waiting == ["ack_soon", "fail"]
        box.release()
        await settle()
        assert phases.path("s")[-7:] == [
            "failing",
            "backoff",
            "starting",
            "claiming",
            "holding",
            "running",
            "idle",
        ]
        assert ops(rig.store) == ["claim_next", "ack_soon", "fail", "claim_next", "ack_soon"]
        assert rig.store.summary() == {}
    assert calls == [(1, 1), (2, 1), (2, 2)]


async def test_a_kill_while_waiting_for_a_handoff_does_not_fail_the_message_that_returned(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    """1 returns while 2 was announced and a send of 3 reserved the actor: the actor
    waits for the handoff with 1's ack not yet submitted (it would go with the claim
    of 2). A kill there must not fail 1, whose handler returned."""
    go = trio.Event()
    calls: list[tuple[Any, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt))
        if msg.body == 1:
            await go.wait()

    async with running(handler, max_attempts=1, **AT_ONCE) as rig:
        first = rig.put("s", 1).id
        await settle()
        rig.put("s", 2)  # announced while 1 runs: the actor is not caught up
        insert = rig.store.hold("append", after_seal=True)  # reserved, not yet inserted
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.send, "s", 3)
            await insert.reached()
            assert live(rig).reserved
            go.set()
            await settle()
            assert phases.actors("s") == [
                ["new", "starting", "claiming", "holding", "running", "handoff"]
            ]
            assert rig.store.summary()[first] == ("in flight", 1)  # its ack not submitted
            assert live(rig).kill()
            await settle()
            insert.release()
        await settle()
        assert rig.store.state_of(first) == "gone"  # acked: its handler returned
        assert (rig.sup.failed_attempts, rig.sup.dead) == (0, 0)
    assert calls == [(1, 1), (2, 1), (3, 1)]


# -- timeouts ------------------------------------------------------------------------


async def test_a_handler_timeout_cancels_it_and_fails_the_attempt(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    calls: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append(msg.attempt)
        if msg.attempt == 1:
            await trio.sleep_forever()

    async with running(handler, handler_timeout=5, **AT_ONCE) as rig:
        row = rig.put("s", "slow")
        await settle()
        restart = rig.store.hold("claim_next")
        still_clock.jump(5)
        await restart.reached()
        assert rig.store.summary() == {row.id: ("pending", 1)}
        assert "HandlerTimeoutError" in (row.last_error or "")
        restart.release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running",
                "stopping failing backoff",  # stopped() runs after a timeout
                "starting claiming holding running idle",
            )
        ]
        assert rig.sup.watchdog.timeouts == 1
        assert (rig.sup.failed_attempts, rig.sup.processed) == (1, 1)
    assert calls == [1, 2]


@pytest.mark.parametrize("how", ["returns", "raises"])
async def test_a_timeout_arriving_as_the_handler_ends_fails_the_attempt(
    still_clock: trio.testing.MockClock, phases: PhaseLog, how: str
) -> None:
    """The watchdog cancels the handler in the step it returns (or raises), so the
    cancellation never reaches it: it did outlive handler_timeout, and what it
    did to ctx.state is not committed."""
    calls: list[tuple[int, Any]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.attempt, ctx.state.get("runs")))
        ctx.state["runs"] = ctx.state.get("runs", 0) + 1
        if msg.attempt == 1:
            live(rig).time_out()  # (what the watchdog does at the deadline)
            if how == "raises":
                raise ValueError("its own error, after the timeout")

    async with running(handler, handler_timeout=5, **AT_ONCE) as rig:
        again = rig.store.hold("claim_next", nth=2)
        row = rig.put("s", "m")
        await again.reached()
        assert rig.store.summary() == {row.id: ("pending", 1)}
        assert "HandlerTimeoutError" in (row.last_error or "")
        assert rig.store.states == {}
        again.release()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running",
                "stopping failing backoff",
                "starting claiming holding running idle",
            )
        ]
        assert rig.store.states == {"s": '{"runs":1}'}
    assert calls == [(1, None), (2, None)]


# -- failures ---------------------------------------------------------------------------


async def test_a_handler_that_raises_is_retried_then_dead_lettered(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    calls: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append(msg.attempt)
        raise ValueError("boom")

    async with running(handler, max_attempts=2, **AT_ONCE) as rig:
        second = rig.store.hold("claim_next", nth=2)
        row = rig.put("s", "poison")
        await second.reached()
        assert rig.store.summary() == {row.id: ("pending", 1)}  # retry: counted
        assert "ValueError: boom" in (row.last_error or "")
        second.release()
        await settle()
        failed = "running stopping failing backoff starting"
        assert phases.actors("s") == [
            # dead-lettered at last: nothing left to claim
            walk(
                "new starting claiming holding", failed, "claiming holding", failed, "claiming idle"
            )
        ]
        assert rig.store.summary() == {row.id: ("dead", 2)}
        [dead] = rig.store.dead_letters(None, None)
        assert dead.attempts == 2 and "ValueError: boom" in dead.last_error
        sup = rig.sup
        assert (sup.failed_attempts, sup.restart_count, sup.dead, sup.dead_lettered) == (2, 2, 1, 1)
        assert sup.outstanding.value == 0
    assert calls == [1, 2]


async def test_a_rejection_dead_letters_at_once_and_counts_no_restart(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    store = MemoryStore()
    rejected = store.put("s", "bad").id
    store.put("s", "good")
    calls: list[tuple[Any, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt))
        if msg.body == "bad":
            raise actors.Reject("unknown command")

    async with running(handler, store) as rig:  # (default backoffs: a rejection waits none)
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running stopping failing",
                "backoff",  # failing gave back "good", claimed in bulk
                "starting claiming holding running idle",
            )
        ]
        assert ops(rig.store) == ["claim_next", "release_many", "fail", "claim_next", "ack_soon"]
        assert rig.store.summary() == {rejected: ("dead", 1)}
        assert rig.store.dead_letters(None, None)[0].last_error.startswith(
            "rejected by the handler: unknown command"
        )
        assert (rig.sup.restart_count, rig.sup.dead) == (0, 1)
        assert trio.current_time() == 0  # no backoff waited
    assert calls == [("bad", 1), ("good", 1)]


async def test_a_failing_start_is_charged_to_the_head_message(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    starts: list[int] = []
    calls: list[tuple[Any, int]] = []

    class FailsFirst(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            starts.append(1)
            if len(starts) == 1:
                raise RuntimeError("cannot start")

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            calls.append((msg.body, msg.attempt))

    async with running(FailsFirst, **AT_ONCE) as rig:
        rig.put("s", "m")
        await settle()
        assert phases.actors("s") == [
            walk("new starting failing backoff", "starting claiming holding running idle")
        ]
        # started() reads the state first; the failure claims the head to fail it.
        assert ops(rig.store) == [
            "load_state",
            "claim_next",
            "fail",
            "load_state",
            "claim_next",
            "ack_soon",
        ]
        assert (rig.sup.restart_count, rig.sup.failed_attempts) == (1, 1)
    assert calls == [("m", 2)]  # the failed start was its first attempt


async def test_a_start_that_always_fails_dead_letters_the_head_then_leaves(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    class NeverStarts(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            raise RuntimeError("cannot start")

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            raise AssertionError("never runs")

    async with running(NeverStarts, max_attempts=2, **AT_ONCE) as rig:
        row = rig.put("s", "m")
        await settle()
        failed = "starting failing"
        assert phases.actors("s") == [
            walk("new", failed, "backoff", failed, "backoff", failed, "left")
        ]
        assert rig.store.summary() == {row.id: ("dead", 2)}
        assert "RuntimeError: cannot start" in rig.store.dead_letters(None, None)[0].last_error
        assert rig.actor("s") is None


async def test_a_kill_in_stopped_after_a_handler_error_keeps_that_error(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    gate = trio.Event()

    class SlowStop(actors.Actor):
        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            raise ValueError("the handler's own error")

        async def stopped(self, ctx: actors.Context) -> None:
            await gate.wait()

    async with running(SlowStop, max_attempts=1, **AT_ONCE) as rig:
        row = rig.put("s", "m")
        await settle()
        assert phases.path("s")[-2:] == ["running", "stopping"]
        assert live(rig).kill()
        await settle()
        gate.set()
        assert rig.store.summary() == {row.id: ("dead", 1)}
        assert "ValueError: the handler's own error" in (row.last_error or "")


async def test_a_store_failure_on_a_claim_fails_the_supervisor_loudly(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    with pytest.raises(BaseExceptionGroup) as failure:
        async with running(Seen()) as rig:
            rig.store.fail_next("claim_next", "injected")
            row = rig.put("s", "m")
            await settle()
    # (Any other task's next call raises too: the store failed.)
    assert failure.group_contains(StoreError, match="claim_next failed: injected", depth=2)
    assert phases.actors("s") == [["new", "starting", "claiming", "releasing", "left"]]
    assert rig.store.failed.is_set()
    assert rig.store.summary() == {row.id: ("pending", 0)}  # the failed claim wrote nothing


# -- stops -----------------------------------------------------------------------------


async def test_a_stop_while_idle(still_clock: trio.testing.MockClock, phases: PhaseLog) -> None:
    async with running(Seen()) as rig:
        rig.put("s", "m")
        await settle()
        rig.stop(10)
        await settle()
        assert phases.actors("s") == [
            ["new", "starting", "claiming", "holding", "running", "idle", "stopping", "left"]
        ]
        assert rig.stop_done.is_set() and trio.current_time() == 0
        assert rig.store.summary() == {}


async def test_a_graceful_stop_lets_the_running_handler_finish_and_gives_back_the_rest(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    go = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await go.wait()

    async with running(handler) as rig:
        first, second = rig.put("s", 1).id, rig.put("s", 2).id  # 2 is claimed in bulk
        await settle()
        rig.stop(10)
        await settle()
        assert rig.store.summary() == {first: ("in flight", 1), second: ("in flight", 1)}
        go.set()
        await settle()
        assert phases.actors("s") == [
            walk("new starting claiming holding running idle", "releasing stopping left")
        ]
        assert rig.store.summary() == {second: ("pending", 0)}  # never started: uncounted
        assert (rig.sup.processed, rig.sup.outstanding.value) == (1, 1)


async def test_a_hard_stop_cancels_the_handler_and_keeps_its_attempt_counted(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep_forever()

    async with running(handler) as rig:
        first, second = rig.put("s", 1).id, rig.put("s", 2).id
        await settle()
        rig.stop(10)
        await settle()
        still_clock.jump(10)  # the grace is over
        await settle()
        assert phases.actors("s") == [
            walk("new starting claiming holding running releasing", "left")
        ]
        assert rig.store.summary() == {first: ("pending", 1), second: ("pending", 0)}


async def test_a_stop_while_claiming_gives_the_claim_back(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    async with running(Seen()) as rig:
        held = rig.store.hold("claim_next")
        row = rig.put("s", "m")
        await held.reached()
        rig.stop(10)
        held.release()
        await settle()
        assert phases.actors("s") == [
            ["new", "starting", "claiming", "holding", "releasing", "stopping", "left"]
        ]
        assert ops(rig.store) == ["claim_next", "release", "after_commits"]
        assert rig.store.summary() == {row.id: ("pending", 0)}


# -- claim on delivery ----------------------------------------------------------------


async def test_a_crash_gives_back_the_handed_messages_behind_it(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    calls: list[tuple[Any, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt))
        if msg.body == 1 and msg.attempt == 1:
            raise ValueError("1 fails once")

    async with running(handler, **AT_ONCE) as rig:
        rig.put("s", 0)
        await settle()
        phases.clear()
        failing = rig.store.hold("fail")
        ids = await rig.send_many("s", [1, 2, 3])  # handed, all three
        await failing.reached()
        assert phases.actors("s") == [["idle", "holding", "running", "stopping", "failing"]]
        # 2 and 3 were never started: pending again, attempt given back.
        assert rig.store.summary() == {
            ids[0]: ("in flight", 1),
            ids[1]: ("pending", 0),
            ids[2]: ("pending", 0),
        }
        failing.release()
        await settle()
        assert phases.path("s")[5:] == (
            walk("backoff starting claiming", "holding running " * 3, "idle")
        )
        assert rig.store.summary() == {}
    assert calls == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1)]


async def test_a_handoff_reserved_as_the_actor_crashes_is_given_back_and_claimed(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler, **AT_ONCE) as rig:
        rig.put("s", 0)
        await settle()
        phases.clear()
        insert = rig.store.hold("append", after_seal=True)  # sealed: the actor reserved
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.send, "s", 1)
            await insert.reached()
            assert live(rig).reserved
            assert live(rig).kill()
            await settle()
            # The new incarnation waits for the reservation (no claim meanwhile).
            assert phases.actors("s") == [["idle", "failing", "backoff", "starting", "handoff"]]
            insert.release()
        await settle()
        assert phases.actors("s") == [
            walk("idle failing backoff starting handoff", "claiming holding running idle")
        ]
        # Inserted claimed for the old serving period: given back, then claimed.
        assert ops(rig.store)[-4:] == ["append", "release_many_soon", "claim_next", "ack_soon"]
        assert rig.store.summary() == {}
    assert handler.calls == [(0, 1), (1, 1)]


async def test_a_stop_while_a_handoff_is_reserved_leaves_the_message_pending(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler) as rig:
        rig.put("s", 0)
        await settle()
        phases.clear()
        insert = rig.store.hold("append", after_seal=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.send, "s", 1)
            await insert.reached()
            rig.stop(10)
            await settle()
            assert phases.actors("s") == [["idle", "stopping", "left"]]
            insert.release()
        await rig.stop_done.wait()
        msg_id = rig.store.next_seq - 1
        assert rig.store.summary() == {msg_id: ("pending", 0)}
        assert ops(rig.store)[-2:] == ["after_commits", "release_many_soon"]
    assert handler.calls == [(0, 1)]


# -- passivation --------------------------------------------------------------------


async def test_a_notice_arriving_as_the_actor_retires_keeps_it(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler, idle_timeout=5) as rig:
        rig.put("s", 0)
        await settle()
        # As it stops its instance for the idle timeout, work comes.
        phases.when(Phase.STOPPING, lambda actor: rig.put("s", 1))
        still_clock.jump(5)
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming holding running idle stopping",
                "starting claiming holding running idle",
            )
        ]
        assert rig.store.summary() == {}
    assert handler.calls == [(0, 1), (1, 1)]


async def test_an_idle_timeout_crossing_a_handoff_runs_the_message_once(
    still_clock: trio.testing.MockClock, phases: PhaseLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle timeout unparks the actor; before it runs, the router seals a batch
    and reserves it (still idle: serving). The actor runs before the insert commits:
    it finds nothing new, its retirement is refused (reserved), and its next
    incarnation waits for the handoff, which belongs to the period that ended:
    given back, then claimed."""
    handler = Seen()
    async with running(handler, idle_timeout=5) as rig:
        rig.put("s", 0)
        await settle()
        phases.clear()
        insert = rig.store.hold("append")  # not yet sealed
        # A transaction in front of the insert, slow to commit.
        slow = rig.store.hold("heartbeat_soon")
        rig.store.heartbeat_soon("{}")
        expire = IdleWatch._expire

        def expire_then_seal(watch: IdleWatch, actor: Any) -> None:
            expire(watch, actor)
            insert.release()  # sealed now: the actor, not yet running, is reserved

        monkeypatch.setattr(IdleWatch, "_expire", expire_then_seal)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.send, "s", 1)
            await insert.reached()
            still_clock.jump(5)
            await settle()
            assert phases.actors("s") == [["idle", "stopping", "starting", "handoff"]]
            slow.release()
        await settle()
        assert phases.actors("s") == [
            walk("idle stopping starting handoff", "claiming holding running idle")
        ]
        assert ops(rig.store)[-5:] == [
            "heartbeat_soon",
            "append",
            "release_many_soon",
            "claim_next",
            "ack_soon",
        ]
        assert rig.store.summary() == {}
    assert handler.calls == [(0, 1), (1, 1)]


async def test_a_near_retry_time_keeps_the_slot_and_a_far_one_frees_it(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    handler = Seen()
    async with running(handler, idle_timeout=5) as rig:
        await settle()  # (the timer found nothing to wait for: only "far" will wake it)
        now = rig.clock.now()
        rig.put("near", 1, not_before=now + 2)
        far = rig.put("far", 2, not_before=now + 20)
        await settle()
        assert phases.actors("near") == [["new", "starting", "claiming", "due"]]
        assert phases.actors("far") == [["new", "starting", "claiming", "stopping", "left"]]
        still_clock.jump(2)
        await settle()
        assert phases.actors("near") == [
            ["new", "starting", "claiming", "due", "claiming", "holding", "running", "idle"]
        ]
        assert rig.store.summary() == {far.id: ("pending", 0)}
        still_clock.jump(18)  # the timer brings "far" back
        await settle()
        assert phases.actors("far")[1] == [
            "new",
            "starting",
            "claiming",
            "holding",
            "running",
            "idle",
        ]
        assert rig.store.summary() == {}
    assert handler.calls == [(1, 1), (2, 1)]


# -- crash suspects -------------------------------------------------------------------


async def test_a_crash_suspect_on_its_last_attempt_runs_alone(
    still_clock: trio.testing.MockClock, phases: PhaseLog
) -> None:
    store = MemoryStore()
    store.put("b", "b1")
    # In flight, its handler started, when the process died: recovery marks it
    # crashed with its 3 attempts counted (max_attempts 4: the next is the last).
    suspect = store.put("s", "x", state=IN_FLIGHT, attempts=3)
    store.marks.mark(store.marks.acquire(), suspect.id)
    store.put("b", "b2")
    assert store.recover() == 1
    assert suspect.crashed and suspect.attempts == 3
    go = trio.Event()
    calls: list[tuple[Any, int, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt, rig.sup.in_flight()))
        if msg.body == "b1":
            await go.wait()

    async with running(handler, store) as rig:
        await settle()
        # b1 runs (b2 claimed in bulk behind it); the suspect waits for it to end.
        assert phases.actors("s") == [["new", "starting", "claiming", "isolation"]]
        assert rig.sup.isolating is live(rig)
        go.set()
        await settle()
        assert phases.actors("s") == [
            walk(
                "new starting claiming isolation claiming holding running",
                "acking claiming idle",  # its ack commits before the others go on
            )
        ]
        assert phases.actors("b") == [
            walk(
                "new starting claiming holding running",
                "releasing isolation",  # b2, handed, given back while the suspect runs
                "claiming holding running idle",
            )
        ]
        assert rig.store.summary() == {}
        assert rig.sup.isolating is None
    assert calls == [("b1", 1, 1), ("x", 4, 1), ("b2", 1, 1)]
