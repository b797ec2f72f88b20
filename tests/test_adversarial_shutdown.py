"""System.shutdown(grace): a graceful stop from any task, as a deploy's SIGTERM asks for.

What must hold: after shutdown() begins no handler starts; running ones
finish within ``grace`` and their acks commit (so nothing they finished runs
again after the restart); those that overrun are cancelled and their message
is pending again, the attempt counted; the ``async with`` block ends without
an exception, whatever its own tasks were doing (sending, draining,
waiting); and shutdown() may be called any number of times, from anywhere.
"""

from __future__ import annotations

import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import Blocking, rerun, rows

import actors


async def test_a_handler_that_finishes_within_grace_is_acked_and_not_run_again(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()
    done: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        entered.set()
        await trio.sleep(3)
        ctx.state["seen"] = msg.body
        done.append(msg.body)

    async def stop_when_busy(system: actors.System) -> None:
        await entered.wait()
        await system.shutdown(10)
        raise AssertionError("unreachable: shutdown() cancels the block it was called from")

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", 1)
        await system.send("s", 2)  # queued behind: must not start
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_when_busy, system)
            await trio.sleep_forever()
    # The block ended normally once the running handler finished (3 s, not 10).
    assert trio.current_time() - began == pytest.approx(3, abs=0.01)
    assert done == [1]
    assert system.closed
    # Acked with its state: gone from the queue. The next one never started.
    assert rows(db_path, "SELECT body, state, attempts FROM messages") == [("2", 0, 0)]
    assert rows(db_path, "SELECT value FROM state") == [('{"seen":1}',)]
    assert await rerun(db_path) == [(2, 1)]  # 1 is not run again


async def test_a_handler_that_overruns_grace_is_cancelled_and_stays_pending(
    db_path: str, autojump_clock: object
) -> None:
    stuck = Blocking()
    async with actors.run_system(db_path, handler=stuck, shutdown_timeout=100) as system:
        await system.send("s", 1)
        await stuck.entered.wait()
        began = trio.current_time()
        await system.shutdown(2)
    # The grace of shutdown(), not shutdown_timeout.
    assert trio.current_time() - began == pytest.approx(2, abs=0.01)
    assert stuck.cancelled == [1]
    # Pending again, the attempt counted: its redelivery says attempt 2.
    assert rows(db_path, "SELECT body, state, attempts FROM messages") == [("1", 0, 1)]
    assert await rerun(db_path) == [(1, 2)]


async def test_nothing_starts_after_shutdown_begins(db_path: str, autojump_clock: object) -> None:
    started: list[tuple[str, object]] = []
    a_running = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        started.append((msg.session_id, msg.body))
        if msg.body == "a1":
            a_running.set()
            await trio.sleep(5)

    async with actors.run_system(db_path, handler=handler, max_active=1) as system:
        await system.send("a", "a1")
        await a_running.wait()
        await system.send("a", "a2")  # handed to a's actor (claimed on delivery)
        await system.send("b", "b1")  # waits for a slot
        await system.send("c", "c1", delay=1)  # comes due during the grace
        assert system.statistics().waiting_sessions == 1
        await system.shutdown(10)
    assert started == [("a", "a1")]
    # a1 was acked; the others are pending, no attempt used (a2 was claimed
    # on delivery and given back unstarted).
    assert rows(db_path, "SELECT body, state, attempts FROM messages ORDER BY id") == [
        ('"a2"', 0, 0),
        ('"b1"', 0, 0),
        ('"c1"', 0, 0),
    ]
    assert sorted(await rerun(db_path)) == [("a2", 1), ("b1", 1), ("c1", 1)]


async def test_shutdown_is_idempotent_and_a_second_call_can_only_shorten_the_grace(
    db_path: str, autojump_clock: object
) -> None:
    slow = Blocking(50)
    returned: list[float] = []

    async def stop(system: actors.System, grace: float) -> None:
        await system.shutdown(grace)
        returned.append(trio.current_time())

    async with trio.open_nursery() as outside:
        async with actors.run_system(db_path, handler=slow) as system:
            await system.send("s", 1)
            await slow.entered.wait()
            began = trio.current_time()
            outside.start_soon(stop, system, 30)
            outside.start_soon(stop, system, 40)  # longer: changes nothing
            await trio.sleep(5)  # (the block is cancelled: this ends at once)
            raise AssertionError("unreachable")
        # The block ended once the system stopped, 30 s after the calls.
        assert trio.current_time() - began == pytest.approx(30, abs=0.01)
    # Both calls returned when it was over, not before.
    assert returned == [pytest.approx(began + 30, abs=0.01)] * 2
    # After the stop: returns at once.
    await system.shutdown(1)
    assert rows(db_path, "SELECT attempts FROM messages") == [(1,)]

    # shutdown(0) after shutdown(30): the handler is cancelled now.
    slow.entered = trio.Event()
    hastened: list[float] = []

    async def then_at_once(system: actors.System) -> None:
        await trio.testing.wait_all_tasks_blocked()
        hastened.append(trio.current_time())
        await system.shutdown(0)

    async with trio.open_nursery() as outside, actors.run_system(db_path, handler=slow) as system:
        await slow.entered.wait()
        began = trio.current_time()
        outside.start_soon(stop, system, 30)
        outside.start_soon(then_at_once, system)
    assert hastened == [began]
    assert trio.current_time() - began == pytest.approx(0, abs=0.01)
    assert rows(db_path, "SELECT attempts FROM messages") == [(2,)]


async def test_shutdown_after_the_block_began_to_leave_shortens_its_grace(
    db_path: str, autojump_clock: object
) -> None:
    # Leaving the block starts the stop with shutdown_timeout; a shutdown()
    # from elsewhere meanwhile (a signal during a slow stop) brings it closer.
    slow = Blocking(50)
    async with (
        trio.open_nursery() as outside,
        actors.run_system(db_path, handler=slow, shutdown_timeout=30) as system,
    ):
        await system.send("s", 1)
        await slow.entered.wait()
        began = trio.current_time()

        async def later() -> None:
            await trio.sleep(1)
            await system.shutdown(2)

        outside.start_soon(later)
    assert trio.current_time() - began == pytest.approx(3, abs=0.01)


async def test_shutdown_from_another_task_while_producers_send(db_path: str, clock: object) -> None:
    # On both clocks: with the real one, the committer's group commits (sends
    # are in flight in the router's batches when the stop begins).
    acked: list[int] = []
    handled: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep(0.001)
        handled.append(msg.id)

    enough = trio.Event()

    async def produce(system: actors.System, session: str) -> None:
        n = 0
        while True:
            acked.append(await system.send(session, n))
            n += 1
            if len(acked) >= 300:
                enough.set()

    async def stop_later(system: actors.System) -> None:
        await enough.wait()
        await system.shutdown(5)

    async with (
        actors.run_system(db_path, handler=handler) as system,
        trio.open_nursery() as nursery,
    ):
        for i in range(8):
            nursery.start_soon(produce, system, f"s{i}")
        nursery.start_soon(stop_later, system)
        await system.drain()  # never done: the producers keep going
    # No exception left the block: every producer ended with the cancellation.
    assert len(acked) >= 300 and len(set(acked)) == len(acked)
    # Nothing acknowledged was lost, nothing handled is left, nothing ran
    # twice: every acknowledged message is either handled or pending, with
    # no attempt used.
    left = dict(rows(db_path, "SELECT id, attempts FROM messages WHERE state != 2"))
    assert set(left).isdisjoint(handled)
    assert set(acked) <= set(left) | set(handled)
    assert set(left.values()) <= {0}
    seen: list[int] = []

    async def again(ctx: actors.Context, msg: actors.Message) -> None:
        assert msg.attempt == 1
        seen.append(msg.id)

    async with actors.run_system(db_path, handler=again) as system:
        await system.drain()
    assert sorted(seen) == sorted(left)


async def test_a_task_of_the_block_that_sends_after_the_stop_began_is_cancelled(
    db_path: str, autojump_clock: object
) -> None:
    # A task woken just before the stop cancelled the block runs on until
    # its next checkpoint: its send() must end with that cancellation, not
    # with SystemClosedError (which would fail the block and stop hard).
    go = trio.Event()
    outcome: list[str] = []

    async def sender(system: actors.System) -> None:
        await go.wait()
        assert system.closed  # the stop began, the task has not seen a checkpoint yet
        try:
            await system.send("s", "late")
        except trio.Cancelled:
            outcome.append("cancelled")
            raise
        except actors.SystemClosedError:
            outcome.append("refused")
            raise

    async def stopper(system: actors.System) -> None:
        go.set()
        await system.shutdown(1)

    async with (
        actors.run_system(db_path, handler=lambda_noop) as system,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(sender, system)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(stopper, system)
    assert outcome == ["cancelled"]
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


async def lambda_noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def test_outside_the_block_sends_are_refused_and_shutdown_returns_when_stopped(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()
    order: list[str] = []

    async def slow(ctx: actors.Context, msg: actors.Message) -> None:
        entered.set()
        await trio.sleep(3)
        order.append("handler done")

    async with trio.open_nursery() as outside:
        async with actors.run_system(db_path, handler=slow) as system:
            await system.send("s", 1)
            await entered.wait()

            async def stop() -> None:
                await system.shutdown(10)
                order.append("shutdown returned")

            outside.start_soon(stop)
            await trio.testing.wait_all_tasks_blocked()
            # (This task is the block's own: it was cancelled, so use another one.)
        order.append("block ended")
        with pytest.raises(actors.SystemClosedError):
            await system.send("s", 2)
        health = await system.health()
        assert not health.healthy
    assert order == ["handler done", "block ended", "shutdown returned"]


async def test_an_outside_sender_during_the_grace_is_refused(
    db_path: str, autojump_clock: object
) -> None:
    slow = Blocking(3)
    refused: list[BaseException] = []

    async with trio.open_nursery() as outside, actors.run_system(db_path, handler=slow) as system:
        await system.send("s", 1)
        await slow.entered.wait()

        async def send_during_grace() -> None:
            await trio.sleep(1)  # the stop began; a handler still runs
            assert system.statistics().in_flight == 1
            try:
                await system.send("t", "late")
            except actors.SystemClosedError as exc:
                refused.append(exc)

        outside.start_soon(send_during_grace)
        await system.shutdown(10)
    assert len(refused) == 1
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


async def test_a_handler_can_stop_the_system_and_is_acked(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)
        if msg.body == "stop":
            await ctx.system.shutdown(10)  # returns at once: the stop waits for us
            await trio.sleep(1)
            ctx.state["stopped"] = True

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send_many([("s", "stop"), ("s", "after")])
        began = trio.current_time()
        await trio.sleep_forever()  # cancelled by the handler's shutdown()
    assert trio.current_time() - began == pytest.approx(1, abs=0.01)
    assert seen == ["stop"]
    assert rows(db_path, "SELECT body, attempts FROM messages") == [('"after"', 0)]
    assert rows(db_path, "SELECT value FROM state") == [('{"stopped":true}',)]


async def test_a_task_a_handler_started_can_stop_the_system_and_is_acked(
    db_path: str, autojump_clock: object
) -> None:
    """shutdown() from a task in the handler's own nursery returns at once too:
    waiting, it would hold the handler (and so the stop) for the whole grace."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.system.shutdown, math.inf)
        ctx.state["stopped"] = True

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send_many([("s", "stop"), ("s", "after")])
        began = trio.current_time()
        await trio.sleep_forever()  # cancelled by the shutdown()
    assert trio.current_time() - began < 1  # not a grace's worth (it is infinite)
    assert rows(db_path, "SELECT body, attempts FROM messages") == [('"after"', 0)]
    assert rows(db_path, "SELECT value FROM state") == [('{"stopped":true}',)]


@pytest.mark.parametrize(
    ("grace", "error"),
    [
        ("1", TypeError),
        (None, TypeError),
        (True, TypeError),
        (-1, ValueError),
        (math.nan, ValueError),
        (-math.inf, ValueError),
    ],
)
async def test_bad_grace_is_refused_and_the_system_runs_on(
    db_path: str, autojump_clock: object, grace: object, error: type[Exception]
) -> None:
    seen: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(error, match="grace"):
            await system.shutdown(grace)  # type: ignore[arg-type]
        assert not system.closed
        await system.send("s", 1)
        await system.drain()
    assert seen == [1]


async def test_infinite_grace_waits_for_the_handler(db_path: str, autojump_clock: object) -> None:
    slow = Blocking(10_000)
    async with actors.run_system(db_path, handler=slow, handler_timeout=None) as system:
        await system.send("s", 1)
        await slow.entered.wait()
        began = trio.current_time()
        await system.shutdown(math.inf)
    assert trio.current_time() - began == pytest.approx(10_000, abs=0.01)
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


def demo(db: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(
        [sys.executable, "-m", "actors", "demo", "--db", db, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def wait_for_progress(proc: subprocess.Popen[str], seconds: float = 60) -> list[str]:
    """Read the demo's output until a progress line shows handled messages."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"processed\s+(\d+)", line)
        if match and int(match.group(1)) > 0:
            return lines
    proc.kill()
    raise AssertionError(f"no progress from the demo: {''.join(lines)}")


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGTERM], [signal.SIGINT], [signal.SIGTERM, signal.SIGINT]],
    ids=["SIGTERM", "SIGINT", "twice"],
)
def test_the_demo_stops_gracefully_on_a_signal(tmp_path: Path, signals: list[int]) -> None:
    db = str(tmp_path / "demo.db")
    # Enough work to be mid-run for seconds; no chaos but the rare hang
    # (which handler_timeout ends, with an error recorded).
    # --duration 0: send as fast as possible, so that a backlog is pending
    # when the signal comes (spread over time, the work keeps up with sends).
    workload = ["--sessions", "20", "--messages", "500", "--duration", "0"]
    workload += ["--fail-rate", "0", "--poison-rate", "0"]
    proc = demo(db, *workload, "--kill-interval", "100000")
    wait_for_progress(proc)
    for sig in signals:
        proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopping gracefully" in output
    assert "Traceback" not in output
    # Nothing in flight, nothing marked as crashed; some work left pending.
    by_state = dict(rows(db, "SELECT state, count(*) FROM messages GROUP BY state"))
    assert set(by_state) <= {0, 2} and by_state.get(0, 0) > 0, by_state
    assert rows(db, "SELECT count(*) FROM messages WHERE crashed = 1") == [(0,)]
    # A message whose handler was started and stopped by the stop (not by a
    # handler timeout, which records its error) would run again: none, unless
    # the second signal cancelled the running handlers at once.
    rerun = rows(
        db, "SELECT count(*) FROM messages WHERE state = 0 AND attempts > 0 AND last_error IS NULL"
    )[0][0]
    if len(signals) == 1:
        assert rerun == 0
    # The next run recovers nothing and finishes the work left.
    proc = demo(db, "--sessions", "1", "--messages", "1")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    recovered = re.search(r"recovered (\d+) in-flight", output)
    assert recovered is None or recovered.group(1) == "0", output
    assert rows(db, "SELECT count(*) FROM messages WHERE state < 2") == [(0,)]
