"""actors.testing: the chaos toolkit must do what it says, or its green means nothing.

The monkey is checked against a fake system (a fixed set of busy sessions)
for its rate and its reproducibility, and against a real one for kills that
land mid-message. The wrappers are called directly, thousands of times, and
their injections counted against their rates. The recorder's checks are fed
histories with one planted violation each and must catch it.

Everything timed runs on trio's MockClock (``autojump_clock``).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

import actors
import actors.testing
from actors.testing import Recorder

# -- helpers -------------------------------------------------------------------


class FakeSystem:
    """What the monkey needs of a System: candidates, and kill()."""

    def __init__(self, busy: list[str], *, lands: bool = True) -> None:
        self.busy = busy
        self.lands = lands
        self.killed: list[str] = []

    def busy_sessions(self) -> list[str]:
        return list(self.busy)

    def active_sessions(self) -> list[str]:
        return [*self.busy, "idle"]

    def kill(self, session_id: str) -> bool:
        self.killed.append(session_id)
        return self.lands


def message(message_id: int, attempt: int = 1, session_id: str = "s") -> actors.Message:
    return actors.Message(message_id, session_id, {"n": message_id}, attempt, 0.0)


def context(session_id: str = "s") -> actors.Context:
    return actors.Context(session_id, None)  # type: ignore[arg-type]  # unused by wrappers


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """Whether ``count`` is a plausible Binomial(n, p) draw."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


async def run_monkey(system: Any, seconds: float, **kwargs: Any) -> actors.testing.ChaosMonkey:
    with trio.move_on_after(seconds):
        async with actors.testing.chaos(system, **kwargs) as monkey:
            await trio.sleep_forever()
    return monkey


# -- the monkey ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_monkey_kills_at_the_requested_rate(autojump_clock: object, seed: int) -> None:
    system = FakeSystem(["a", "b", "c", "d", "e"])
    monkey = await run_monkey(system, 100.0, seed=seed, kills_per_second=50)
    stats = monkey.statistics()
    # A Poisson process of rate 50 over 100 s: 5000 +- 5 * sqrt(5000).
    assert abs(stats.ticks - 5000) <= 5 * math.sqrt(5000), stats
    assert stats.kills_attempted == stats.kills_landed == stats.ticks == len(system.killed)
    # The gaps are exponential: their mean is 1/rate, and so is their spread.
    times = [kill.time for kill in monkey.kills]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    assert abs(mean - 0.02) < 0.002, mean
    assert 0.015 < math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) < 0.025
    # Victims are uniform among the busy sessions.
    for session, count in Counter(system.killed).items():
        assert within(count, stats.ticks, 0.2), (session, count)


async def test_monkey_decisions_are_reproducible_per_seed(autojump_clock: object) -> None:
    async def history(seed: int) -> list[tuple[float, str]]:
        start = trio.current_time()
        monkey = await run_monkey(FakeSystem(["a", "b", "c"]), 5.0, seed=seed)
        return [(round(k.time - start, 9), k.session_id) for k in monkey.kills]

    first = await history(7)
    assert len(first) > 100
    assert await history(7) == first
    other = await history(8)
    assert other != first
    assert [t for t, _ in other] != [t for t, _ in first]


async def test_monkey_moments_do_not_depend_on_the_candidates(autojump_clock: object) -> None:
    # Two draws per moment, always: with nothing busy, the moments are the same.
    busy = FakeSystem(["a"])
    idle = FakeSystem([])
    start = trio.current_time()
    with_victims = await run_monkey(busy, 2.0, seed=3)
    assert not (await run_monkey(idle, 2.0, seed=3)).kills
    assert with_victims.statistics().ticks == len(with_victims.kills) > 20
    # Same seed, same moments: replay them on a fresh monkey's stream.
    rng = random.Random(3)
    expected, now = [], 0.0
    for _ in with_victims.kills:
        now += rng.expovariate(50.0)
        rng.random()
        expected.append(now)
    got = [k.time - start for k in with_victims.kills]
    assert got == pytest.approx(expected)


async def test_monkey_with_nothing_busy_only_ticks(autojump_clock: object) -> None:
    monkey = await run_monkey(FakeSystem([]), 1.0, seed=1, kills_per_second=100)
    stats = monkey.statistics()
    assert stats.ticks > 50
    assert stats.kills_attempted == stats.kills_landed == 0


async def test_monkey_counts_kills_that_do_not_land(autojump_clock: object) -> None:
    system = FakeSystem(["a", "b"], lands=False)
    monkey = await run_monkey(system, 1.0, seed=1)
    stats = monkey.statistics()
    assert stats.kills_attempted == len(system.killed) > 10
    assert stats.kills_landed == 0
    assert not any(kill.landed for kill in monkey.kills)


async def test_monkey_target_active_includes_idle_actors(autojump_clock: object) -> None:
    system = FakeSystem(["a"])
    await run_monkey(system, 10.0, seed=1, target="active")
    assert within(Counter(system.killed)["idle"], len(system.killed), 0.5)


async def test_monkey_stops_after_max_kills(autojump_clock: object) -> None:
    system = FakeSystem(["a"])
    monkey = actors.testing.ChaosMonkey(system, seed=1, max_kills=7)  # type: ignore[arg-type]
    with trio.fail_after(60):  # virtual seconds: a monkey that never stops fails here
        await monkey.run()  # returns by itself
    assert monkey.statistics().kills_landed == 7
    assert system.killed == ["a"] * 7


async def test_monkey_refuses_to_run_twice_at_once(autojump_clock: object) -> None:
    monkey = actors.testing.ChaosMonkey(FakeSystem([]), seed=1)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(monkey.run)
        with pytest.raises(RuntimeError, match="already running"):
            await monkey.run()
        nursery.cancel_scope.cancel()


async def test_chaos_stops_the_monkey_when_the_block_ends(autojump_clock: object) -> None:
    async with actors.testing.chaos(FakeSystem(["a"]), seed=1) as monkey:  # type: ignore[arg-type]
        await trio.sleep(1)
    ticks = monkey.statistics().ticks
    assert ticks > 0
    await trio.sleep(10)
    assert monkey.statistics().ticks == ticks


async def test_chaos_raises_the_bodys_exception_unwrapped(autojump_clock: object) -> None:
    with pytest.raises(ValueError, match="from the body") as info:
        async with actors.testing.chaos(FakeSystem(["a"]), seed=1):  # type: ignore[arg-type]
            await trio.sleep(0.1)
            try:
                _ = 1 / 0
            except ZeroDivisionError as exc:
                raise ValueError("from the body") from exc
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # its cause is kept


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"seed": 1, "kills_per_second": 0}, ValueError),
        ({"seed": 1, "kills_per_second": math.inf}, ValueError),
        ({"seed": 1, "target": "idle"}, ValueError),
        ({"seed": 1, "max_kills": 0}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"seed": None}, TypeError),
    ],
)
def test_monkey_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        actors.testing.ChaosMonkey(FakeSystem([]), **kwargs)  # type: ignore[arg-type]


async def test_monkey_kills_busy_actors_mid_message(db_path: str, autojump_clock: object) -> None:
    recorder = Recorder()
    handled = 0
    busy_part_done = trio.Event()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        nonlocal handled
        handled += 1
        if handled >= 1500:
            busy_part_done.set()

    handler = recorder.wrap(actors.testing.slow(handle, min_delay=0.05, max_delay=0.15, seed=1))
    async with actors.run_system(
        db_path, handler=handler, **actors.testing.fast_options()
    ) as system:
        ids = await system.send_many((f"s{i % 20}", i) for i in range(2000))
        start = trio.current_time()
        # The monkey runs while most sessions have work. (Through the tail,
        # where the last few sessions sit out growing restart delays, the
        # share of ticks that find a busy actor varied from run to run: it
        # fell to 0.899 once in CI.)
        async with actors.testing.chaos(system, seed=5, kills_per_second=40) as monkey:
            await busy_part_done.wait()
        seconds = trio.current_time() - start
        await system.drain()
        stats = await actors.testing.quiescent(system)
        dead = system.dead_letters()
    chaos = monkey.statistics()
    # The monkey ticked at its rate, and nearly every tick found a busy actor.
    assert seconds > 5
    assert abs(chaos.ticks - 40 * seconds) <= 5 * math.sqrt(40 * seconds), (chaos, seconds)
    assert chaos.kills_attempted >= 0.9 * chaos.ticks
    assert chaos.kills_landed >= 0.9 * chaos.kills_attempted
    # Kills landed mid-message: handlers were cancelled, each a failed attempt.
    recorded = recorder.statistics()
    assert recorded.cancelled >= 0.8 * chaos.kills_landed, (recorded, chaos)
    assert stats.failed_attempts == recorded.cancelled
    assert stats.restarts >= chaos.kills_landed
    assert {kill.session_id for kill in monkey.kills} <= {f"s{i}" for i in range(20)}
    # And the runtime kept its promises under it.
    assert dead == []
    recorder.assert_all(ids, dead)


async def test_busy_and_active_sessions(db_path: str, autojump_clock: object) -> None:
    release = trio.Event()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "wait":
            await release.wait()

    recorder = Recorder()
    async with actors.run_system(db_path, handler=recorder.wrap(handle)) as system:
        assert system.active_sessions() == system.busy_sessions() == []
        await system.send("b", "quick")
        await system.send("a", "wait")
        await system.send("c", "quick")
        await recorder.wait_until(lambda r: r.running() == {"a": 2})
        await recorder.wait_until(lambda r: r.statistics().completed == 2)
        # A completed message stays in flight until its ack commits: let it.
        await trio.testing.wait_all_tasks_blocked()
        assert system.active_sessions() == ["a", "b", "c"]  # sorted
        assert system.busy_sessions() == ["a"]
        stats = system.statistics()
        assert stats.in_flight == 1 and stats.active_actors == 3
        release.set()
        await actors.testing.quiescent(system)
        assert system.busy_sessions() == []


# -- the wrappers ----------------------------------------------------------------


class Calls:
    """A handler that counts its calls."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.ids.append(msg.id)


async def call_all(handler: Any, n: int, attempt: int = 1) -> list[int]:
    """Call ``handler`` for messages 1..n; the ids whose call raised InjectedFailure."""
    failed = []
    for i in range(1, n + 1):
        try:
            await handler(context(), message(i, attempt))
        except actors.testing.InjectedFailure:
            failed.append(i)
    return failed


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
async def test_flaky_fails_at_its_rate(rate: float) -> None:
    inner = Calls()
    failed = await call_all(actors.testing.flaky(inner, rate=rate, seed=1), 4000)
    assert within(len(failed), 4000, rate)
    # Failing before the handler: the handler ran exactly for the others.
    assert sorted(set(inner.ids) | set(failed)) == list(range(1, 4001))
    assert not set(inner.ids) & set(failed)


async def test_flaky_decisions_are_seeded_per_message_and_attempt() -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    first = await call_all(actors.testing.flaky(handle, rate=0.3, seed=1), 1000)
    assert await call_all(actors.testing.flaky(handle, rate=0.3, seed=1), 1000) == first
    assert await call_all(actors.testing.flaky(handle, rate=0.3, seed=2), 1000) != first
    # A redelivery gets a fresh draw.
    second = await call_all(actors.testing.flaky(handle, rate=0.3, seed=1), 1000, attempt=2)
    assert second != first
    assert within(len(set(first) & set(second)), 1000, 0.09)
    # Call order does not matter: the decision is keyed on the message.
    wrapped = actors.testing.flaky(handle, rate=0.3, seed=1)
    backwards = []
    for i in range(1000, 0, -1):
        try:
            await wrapped(context(), message(i))
        except actors.testing.InjectedFailure:
            backwards.append(i)
    assert sorted(backwards) == first


async def test_flaky_after_runs_the_handler_then_fails_with_the_given_exception() -> None:
    class Boom(Exception):
        pass

    inner = Calls()
    wrapped = actors.testing.flaky(inner, rate=0.5, seed=1, exception=Boom, when="after")
    failed = []
    for i in range(1, 1001):
        try:
            await wrapped(context(), message(i))
        except Boom as exc:
            assert f"message {i}" in str(exc) and "after" in str(exc)
            failed.append(i)
    assert within(len(failed), 1000, 0.5)
    assert inner.ids == list(range(1, 1001))  # every call ran the handler


async def test_slow_delays_at_its_rate_within_its_bounds(autojump_clock: object) -> None:
    inner = Calls()
    wrapped = actors.testing.slow(inner, min_delay=0.2, max_delay=0.6, rate=0.4, seed=3)
    delays = []
    for i in range(1, 2001):
        start = trio.current_time()
        await wrapped(context(), message(i))
        delays.append(trio.current_time() - start)
    delayed = [d for d in delays if d > 0]
    assert within(len(delayed), 2000, 0.4)
    assert all(0.2 <= d <= 0.6 for d in delayed)
    assert abs(sum(delayed) / len(delayed) - 0.4) < 0.02  # uniform: mean in the middle
    assert inner.ids == list(range(1, 2001))


async def test_hang_hangs_at_its_rate(autojump_clock: object) -> None:
    for when in ("before", "after"):
        inner = Calls()
        wrapped = actors.testing.hang(inner, rate=0.25, seed=4, when=when)  # type: ignore[arg-type]
        hung = []
        for i in range(1, 1001):
            with trio.move_on_after(3600) as scope:
                await wrapped(context(), message(i))
            if scope.cancelled_caught:
                hung.append(i)
        assert within(len(hung), 1000, 0.25), when
        ran = set(range(1, 1001)) if when == "after" else set(range(1, 1001)) - set(hung)
        assert set(inner.ids) == ran, when


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda h: actors.testing.flaky(h, rate=1.5, seed=1), ValueError),
        (lambda h: actors.testing.flaky(h, rate=0.5, seed=1, when="during"), ValueError),
        (lambda h: actors.testing.flaky(h, rate=0.5, seed="1"), TypeError),
        (lambda h: actors.testing.hang(h, rate=-0.1, seed=1), ValueError),
        (lambda h: actors.testing.slow(h, max_delay=-1, seed=1), ValueError),
        (lambda h: actors.testing.slow(h, min_delay=2, max_delay=1, seed=1), ValueError),
        (lambda h: actors.testing.slow(h, max_delay=math.nan, seed=1), ValueError),
        (lambda h: actors.testing.flaky(print, rate=0.5, seed=1), TypeError),
        (lambda h: actors.testing.flaky(actors.Actor, rate=0.5, seed=1), TypeError),
        (lambda h: actors.testing.intercept(object(), h), TypeError),
    ],
)
def test_wrappers_reject_bad_arguments(make: Any, error: type[Exception]) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    with pytest.raises(error):
        make(handle)


async def test_wrappers_work_on_actor_subclasses(db_path: str, autojump_clock: object) -> None:
    log: list[str] = []

    class Greeter(actors.Actor):
        """Says hello."""

        async def started(self, ctx: actors.Context) -> None:
            log.append("started")

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            log.append(f"handle {msg.id}")

    wrapped = actors.testing.flaky(Greeter, rate=1.0, seed=1, when="after")
    assert issubclass(wrapped, Greeter)
    assert wrapped.__name__ == "Greeter" and wrapped.__doc__ == "Says hello."
    recorder = Recorder()
    async with actors.run_system(
        db_path, handler=recorder.wrap(wrapped), **actors.testing.fast_options(max_attempts=2)
    ) as system:
        message_id = await system.send("s", "hi")
        await actors.testing.quiescent(system, passivated=True)
        [letter] = system.dead_letters()
    assert letter.id == message_id and letter.attempts == 2
    assert "InjectedFailure" in letter.last_error
    # The handler ran on each attempt, hooks untouched: a fresh instance after
    # each crash, the last one finding nothing to do.
    handled = f"handle {message_id}"
    assert log == ["started", handled, "started", handled, "started"]
    assert [e.outcome for e in recorder.events if e.kind == "end"] == ["failed", "failed"]
    recorder.assert_all([message_id], [letter])


async def test_hang_makes_handler_timeout_fire(db_path: str, autojump_clock: object) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    recorder = Recorder()
    handler = recorder.wrap(actors.testing.hang(handle, rate=1.0, seed=1))
    async with actors.run_system(
        db_path, handler=handler, handler_timeout=2.0, **actors.testing.fast_options(max_attempts=3)
    ) as system:
        start = trio.current_time()
        await system.send("s", "stuck")
        await system.drain()
        assert trio.current_time() - start >= 6.0  # three attempts of 2 s each
        [letter] = system.dead_letters()
    assert "HandlerTimeoutError" in letter.last_error
    assert recorder.statistics().cancelled == 3


async def test_wrappers_compose_and_inject_at_their_rates(
    db_path: str, autojump_clock: object
) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    recorder = Recorder()
    handler = recorder.wrap(
        actors.testing.flaky(
            actors.testing.hang(
                actors.testing.slow(handle, max_delay=0.01, seed=3),
                rate=0.05,
                seed=2,
            ),
            rate=0.2,
            seed=1,
        )
    )
    async with actors.run_system(
        db_path, handler=handler, handler_timeout=1.0, **actors.testing.fast_options()
    ) as system:
        ids = await system.send_many((f"s{i % 25}", i) for i in range(1000))
        stats = await actors.testing.quiescent(system)
        dead = system.dead_letters()
    recorder.assert_all(ids, dead)
    recorded = recorder.statistics()
    assert recorded.completed == 1000 and dead == []
    # Per attempt: flaky fails 20% first, hang stalls 5% of the rest.
    attempts = recorded.started
    injected = sum(isinstance(e.error, actors.testing.InjectedFailure) for e in recorder.events)
    assert injected == recorded.failed
    assert within(recorded.failed, attempts, 0.2)
    assert within(recorded.cancelled, attempts, 0.8 * 0.05)
    assert stats.failed_attempts == recorded.failed + recorded.cancelled


async def test_intercept_runs_middleware_around_both_spellings() -> None:
    trace: list[str] = []

    async def middleware(ctx: actors.Context, msg: actors.Message, proceed: Any) -> None:
        trace.append(f"before {msg.id}")
        await proceed()
        trace.append(f"after {msg.id}")

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        trace.append(f"handle {msg.id}")

    class Handler(actors.Actor):
        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            trace.append(f"method {msg.id}")

    await actors.testing.intercept(handle, middleware)(context(), message(1))
    await actors.testing.intercept(Handler, middleware)().handle(context(), message(2))
    assert trace == ["before 1", "handle 1", "after 1", "before 2", "method 2", "after 2"]


def test_fast_options_are_valid_and_take_overrides() -> None:
    options = actors.testing.fast_options(max_attempts=3, idle_timeout=1.0)
    config = actors.Config(**options)
    assert config.max_attempts == 3 and config.idle_timeout == 1.0
    assert config.restart_policy.backoff.delay(5) == 0.001
    assert config.restart_policy.max_restarts >= 10**6
    assert actors.testing.fast_options() is not actors.testing.fast_options()
    with pytest.raises(TypeError, match="max_attempt"):
        actors.testing.fast_options(max_attempt=3)
    with pytest.raises(ValueError, match="max_attempts"):
        actors.testing.fast_options(max_attempts=0)


# -- quiescence ------------------------------------------------------------------


async def test_quiescent_waits_for_restarts_and_passivation(
    db_path: str, autojump_clock: object
) -> None:
    log: list[str] = []
    busy = trio.Event()

    class Worker(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            log.append("started")

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            busy.set()
            await trio.sleep_forever()

        async def stopped(self, ctx: actors.Context) -> None:
            log.append("stopped")

    async with actors.run_system(
        db_path,
        handler=Worker,
        max_attempts=1,
        idle_timeout=30.0,
        restart_policy=actors.RestartPolicy(backoff=actors.Backoff(initial=5.0, jitter=0)),
    ) as system:
        await system.send("s", "dies")
        await busy.wait()
        start = trio.current_time()
        assert system.kill("s")
        await system.drain()  # the message is dead at once ...
        assert log == ["started"]  # ... while its actor is still to restart
        with trio.fail_after(600):  # virtual: returning too early fails below, never is here
            stats = await actors.testing.quiescent(system, passivated=True)
        # It restarted after 5 s, found nothing, passivated after 30 s more.
        assert trio.current_time() - start >= 35.0
        assert log == ["started", "started", "stopped"]
        assert stats.active_actors == 0 and stats.pending == 0 and stats.in_flight == 0
        assert stats.dead == 1 and system.active_sessions() == []


async def test_quiescent_returns_a_drained_snapshot_even_while_others_send(
    db_path: str, autojump_clock: object
) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep(0.01)

    async with actors.run_system(db_path, handler=handle) as system:

        async def sender() -> None:
            for i in range(50):
                await system.send(f"s{i % 3}", i)
                await trio.sleep(0.02)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            for _ in range(10):
                stats = await actors.testing.quiescent(system)
                assert stats.pending == 0 and stats.in_flight == 0
                await trio.sleep(0.05)
        stats = await actors.testing.quiescent(system)
        assert stats.processed == 50


# -- the recorder: its checks catch what they are for ------------------------------


def history(*calls: tuple[str, int, int, str | None]) -> Recorder:
    """A recorder fed by hand: (session, id, attempt, outcome) is a start, then an end.

    An outcome of None leaves the call running; ``("end", ...)`` entries are
    written with a session of ``"end:<session>"``.
    """
    recorder = Recorder()
    for session, message_id, attempt, outcome in calls:
        if session.startswith("end:"):
            assert outcome is not None
            recorder.record_end(session[4:], message_id, attempt, outcome)  # type: ignore[arg-type]
            continue
        recorder.record_start(session, message_id, attempt)
        if outcome is not None:
            recorder.record_end(session, message_id, attempt, outcome)  # type: ignore[arg-type]
    return recorder


def clean() -> Recorder:
    # s: 1 fails, 1 completes, 3 is killed then completes; t: 2 completes.
    return history(
        ("s", 1, 1, "failed"),
        ("t", 2, 1, "completed"),
        ("s", 1, 2, "completed"),
        ("s", 3, 1, "cancelled"),
        ("s", 3, 2, "completed"),
    )


def test_recorder_passes_a_clean_history() -> None:
    recorder = clean()
    recorder.assert_all([1, 2, 3])
    recorder.assert_fifo()
    recorder.assert_fifo(dead=[])
    recorder.assert_one_at_a_time()
    recorder.assert_honest_attempts()
    assert recorder.completed_ids() == {1, 2, 3}
    assert recorder.statistics() == actors.testing.RecorderStatistics(
        started=5, completed=3, failed=1, cancelled=1, running=0, messages=3
    )


def test_recorder_catches_a_lost_message() -> None:
    recorder = clean()
    with pytest.raises(AssertionError, match=r"no loss: 2 violation\(s\)") as info:
        recorder.assert_no_loss([1, 2, 3, 4, 5], dead=[])
    assert "message 4 was acknowledged and is not dead, but never started" in str(info.value)
    recorder.assert_no_loss([1, 2, 3, 4, 5], dead=[4, 5])
    letter = actors.DeadLetter(4, "s", None, 4, "boom", 0.0)
    with pytest.raises(AssertionError, match="message 5") as info:
        recorder.assert_no_loss([1, 2, 3, 4, 5], dead=[letter])
    assert "message 4" not in str(info.value)
    # Started but never completed: the recorder says how its last call ended.
    killed = history(("s", 1, 1, "cancelled"))
    with pytest.raises(
        AssertionError, match=r"started 1 time\(s\), its last call \(attempt 1\) cancelled"
    ):
        killed.assert_no_loss([1])


def test_recorder_catches_a_message_out_of_order() -> None:
    recorder = history(("s", 2, 1, "completed"), ("s", 1, 1, "completed"))
    with pytest.raises(AssertionError, match=r"message 1 .* started after message 2"):
        recorder.assert_fifo()
    # Other sessions have no order between them.
    history(("s", 2, 1, "completed"), ("t", 1, 1, "completed")).assert_fifo()


def test_recorder_catches_a_session_moving_past_an_unfinished_message() -> None:
    recorder = history(("s", 1, 1, "failed"), ("s", 2, 1, "completed"))
    recorder.assert_fifo()  # without dead letters, only the order is checked
    with pytest.raises(AssertionError, match="message 2 started while message 1"):
        recorder.assert_fifo(dead=[])
    recorder.assert_fifo(dead=[1])  # 1 was dead-lettered: the session moves on
    with pytest.raises(AssertionError, match="FIFO"):
        recorder.assert_all([1, 2])


def test_recorder_catches_two_handlers_at_once_in_a_session() -> None:
    recorder = history(("s", 1, 1, None), ("s", 2, 1, "completed"), ("end:s", 1, 1, "completed"))
    with pytest.raises(AssertionError, match=r"message 2 \(attempt 1\) started while message 1"):
        recorder.assert_one_at_a_time()
    # Overlap across sessions is the point of the runtime.
    history(
        ("s", 1, 1, None), ("t", 2, 1, "completed"), ("end:s", 1, 1, "completed")
    ).assert_one_at_a_time()
    # A redelivery that starts while the killed call still runs overlaps too.
    with pytest.raises(AssertionError, match="still running"):
        history(("s", 1, 1, None), ("s", 1, 2, "completed")).assert_one_at_a_time()
    with pytest.raises(AssertionError, match="ended without having started"):
        history(("end:s", 1, 1, "completed")).assert_one_at_a_time()


def test_recorder_catches_dishonest_attempts() -> None:
    first_not_one = history(("s", 1, 2, "completed"))
    with pytest.raises(AssertionError, match="first delivery said attempt 2"):
        first_not_one.assert_honest_attempts()
    first_not_one.assert_honest_attempts(seen_all=False)

    repeated = history(("s", 1, 1, "cancelled"), ("s", 1, 1, "completed"))
    with pytest.raises(AssertionError, match="must say a higher attempt"):
        repeated.assert_honest_attempts()
    with pytest.raises(AssertionError, match="must say a higher attempt"):
        repeated.assert_honest_attempts(seen_all=False)

    skipped = history(("s", 1, 1, "failed"), ("s", 1, 3, "completed"))
    with pytest.raises(AssertionError, match="attempt 2 was never seen"):
        skipped.assert_honest_attempts()
    skipped.assert_honest_attempts(seen_all=False)

    duplicate = history(("s", 1, 1, "completed"), ("s", 1, 2, "completed"))
    with pytest.raises(AssertionError, match="after attempt 1 completed"):
        duplicate.assert_honest_attempts()


def test_recorder_assert_all_names_every_failed_check() -> None:
    recorder = history(
        ("s", 2, 2, None),
        ("s", 1, 1, "completed"),
    )
    with pytest.raises(AssertionError) as info:
        recorder.assert_all([1, 2, 3])
    text = str(info.value)
    for check in ("no loss", "FIFO per session", "one at a time per session", "honest attempts"):
        assert check in text, check


def test_recorder_lists_at_most_ten_violations() -> None:
    recorder = Recorder()
    with pytest.raises(AssertionError) as info:
        recorder.assert_no_loss(range(1, 26))
    text = str(info.value)
    assert "25 violation(s)" in text and "... and 15 more" in text
    assert text.count("never started") == 10


def test_recorder_rejects_an_unknown_outcome() -> None:
    with pytest.raises(ValueError, match="outcome"):
        Recorder().record_end("s", 1, 1, "done")  # type: ignore[arg-type]


async def test_recorder_records_kills_failures_and_wait_until(
    db_path: str, autojump_clock: object
) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "fail" and msg.attempt == 1:
            raise KeyError("first attempt")
        if msg.body == "hang" and msg.attempt == 1:
            await trio.sleep_forever()

    recorder = Recorder()
    async with actors.run_system(
        db_path, handler=recorder.wrap(handle), **actors.testing.fast_options()
    ) as system:
        ids = [await system.send("s", body) for body in ("ok", "fail", "hang")]
        await recorder.wait_until(lambda r: r.running() == {"s": ids[2]})
        assert recorder.statistics().running == 1
        assert system.kill("s")
        await actors.testing.quiescent(system)
    ends = [(e.message_id, e.attempt, e.outcome) for e in recorder.events if e.kind == "end"]
    assert ends == [
        (ids[0], 1, "completed"),
        (ids[1], 1, "failed"),
        (ids[1], 2, "completed"),
        (ids[2], 1, "cancelled"),
        (ids[2], 2, "completed"),
    ]
    [failure] = [e.error for e in recorder.events if e.outcome == "failed"]
    assert isinstance(failure, KeyError)
    assert all(e.time is not None for e in recorder.events)
    recorder.assert_all(ids)
