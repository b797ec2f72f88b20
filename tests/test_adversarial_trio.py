"""Adversarial trio-level inputs: what a handler, a Ctrl-C or a timeout can do to the runtime.

Issue 16, items 6 to 9 and the channel shape of subscriptions:

- STRAY_CANCELS: handlers that raise a ``trio.Cancelled`` (or a group of
  them) they caught from an inner scope, although their own scope was not
  cancelled. Each is a failed attempt; the system goes on.
- KeyboardInterrupt injected at every line between a task registering
  itself as a waiter and parking (``wait_task_rescheduled``): the system
  stops with KeyboardInterrupt, never with a TrioInternalError.
- Outer timeouts around ``run_system`` with producers in flight: the block
  ends quietly.
- ``drain()`` and ``ask()`` of its own session from inside a handler:
  refused at once.
"""

from __future__ import annotations

import signal
import sys
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import HANG, drain

import actors
import actors._actor
import actors._actor_state
import actors._router
import actors._supervisor
import actors.store.committer

# -- item 6: a Cancelled that was not for the handler ---------------------


async def _cancelled_from_inner_scope() -> BaseException:
    """A Cancelled caught inside a scope that has ended: not for the caller."""
    saved: BaseException | None = None
    with trio.move_on_after(0):
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            saved = exc
            raise
    assert saved is not None
    return saved


async def _raise_inner_cancelled() -> None:
    raise await _cancelled_from_inner_scope()


async def _raise_cancelled_group_from_nursery() -> None:
    saved: BaseException | None = None
    with trio.CancelScope() as scope:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
                await trio.sleep_forever()
        except BaseException as exc:
            saved = exc
            raise
    assert saved is not None
    raise saved


async def _raise_group_of_cancelled_and_error() -> None:
    saved = await _cancelled_from_inner_scope()
    raise BaseExceptionGroup("mixed", [saved, ValueError("and an error")])


STRAY_CANCELS = [
    pytest.param(_raise_inner_cancelled, id="cancelled-from-inner-scope"),
    pytest.param(_raise_cancelled_group_from_nursery, id="group-from-sub-nursery"),
    pytest.param(_raise_group_of_cancelled_and_error, id="group-cancelled-and-error"),
]


@pytest.mark.parametrize("stray", STRAY_CANCELS)
async def test_handler_raising_a_stray_cancelled_fails_the_attempt(
    db_path: str, clock: object, stray: Any
) -> None:
    """The attempt fails (retried, then processed); the system goes on working."""
    seen: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))
        if msg.body == "stray" and msg.attempt == 1:
            await stray()

    async with actors.run_system(
        db_path, handler=handler, retry_backoff=actors.Backoff(initial=0.01, jitter=0)
    ) as system:
        await system.send("s", "stray")
        await drain(system)
        # The supervisor still runs: a new message is processed.
        await system.send("s", "after")
        await system.send("other", "after")
        await drain(system)
        stats = system.statistics()
    assert seen == [("stray", 1), ("stray", 2), ("after", 1), ("after", 1)]
    assert stats.failed_attempts == 1
    assert stats.processed == 3


async def test_started_and_stopped_raising_a_stray_cancelled(db_path: str, clock: object) -> None:
    """started() raising one is a failed start, charged to the head message as
    any failed start is (the handler then sees attempt 2); stopped() raising
    one is ignored."""
    calls: list[str] = []

    class Hostile(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            calls.append("started")
            if calls.count("started") == 1:
                await _raise_inner_cancelled()

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            calls.append(f"handle {msg.body} {msg.attempt}")

        async def stopped(self, ctx: actors.Context) -> None:
            calls.append("stopped")
            await _raise_inner_cancelled()

    async with actors.run_system(
        db_path,
        handler=Hostile,
        idle_timeout=0.01,
        restart_policy=actors.RestartPolicy(backoff=actors.Backoff(initial=0.01, jitter=0)),
    ) as system:
        await system.send("s", "one")
        await drain(system)
        await system.send("s", "two")
        await drain(system)
    assert calls[:3] == ["started", "started", "handle one 2"]
    assert "handle two 1" in calls
    assert "stopped" in calls


async def test_started_always_raising_a_stray_cancelled_ends_in_dead_letters(
    db_path: str, clock: object
) -> None:
    """No crash loop (invariant 5): each failed start uses an attempt of the head."""

    class NeverStarts(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            await _raise_inner_cancelled()

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            raise AssertionError("never reached")

    async with actors.run_system(
        db_path,
        handler=NeverStarts,
        max_attempts=3,
        retry_backoff=actors.Backoff(initial=0.01, jitter=0),
        restart_policy=actors.RestartPolicy(backoff=actors.Backoff(initial=0.01, jitter=0)),
    ) as system:
        await system.send("s", "one")
        await drain(system)
        dead = system.dead_letters()
    assert [(d.session_id, d.attempts) for d in dead] == [("s", 3)]
    assert "stray" in dead[0].last_error or "Cancelled" in dead[0].last_error


# -- item 7: KeyboardInterrupt between registering a task and parking it ----
#
# trio raises KeyboardInterrupt from its SIGINT handler at whatever bytecode
# runs, unless that code is KI-protected (then it is delivered to the main
# task at a checkpoint). A task that registered itself as a waiter (so that
# someone reschedules it) and is interrupted before it parks leaves a
# registration behind: rescheduled later, after it exited or while it waits
# for something else, trio fails with TrioInternalError. The injector below
# calls trio's own SIGINT handler, with the frame that runs, at each line of
# every function of the runtime that parks its task by hand.


def _parking_functions() -> dict[types.CodeType, str]:
    """Every function of the runtime that parks its task with wait_task_rescheduled."""
    found: dict[types.CodeType, str] = {}
    for module in (
        actors._actor,
        actors._actor_state,
        actors._router,
        actors.store.committer,
        actors._supervisor,
    ):
        for obj in vars(module).values():
            members = list(vars(obj).values()) if isinstance(obj, type) else [obj]
            for fn in members:
                code = getattr(fn, "__code__", None)
                if code is not None and "wait_task_rescheduled" in code.co_names:
                    found[code] = f"{fn.__module__}.{fn.__qualname__}"
    return found


PARKING = _parking_functions()
_TRIO_PARKING = {trio.lowlevel.wait_task_rescheduled.__code__}


def test_every_parking_function_is_ki_protected() -> None:
    """The registration and the wait run as one step for KeyboardInterrupt."""
    from trio._core._ki import _CODE_KI_PROTECTION_STATUS_WMAP as protected

    def is_protected(code: types.CodeType) -> bool:
        try:
            return bool(protected[code])
        except KeyError:
            return False

    assert len(PARKING) >= 5, sorted(PARKING.values())  # the injector finds them all
    assert sorted(name for code, name in PARKING.items() if not is_protected(code)) == []


class _Injector:
    """Raise KeyboardInterrupt, as trio's SIGINT handler would, at the ``nth``
    line run in ``target`` (or in trio's wait_task_rescheduled called from it)."""

    def __init__(self, target: types.CodeType, nth: int) -> None:
        self.target = target
        self.nth = nth
        self.lines = 0
        self.fired = False

    def __call__(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if event != "call" or self.fired:
            return None
        code = frame.f_code
        if code is self.target or (
            code in _TRIO_PARKING
            and frame.f_back is not None
            and frame.f_back.f_code is self.target
        ):
            return self._line
        return None

    def _line(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if event == "line" and not self.fired:
            self.lines += 1
            if self.lines == self.nth:
                self.fired = True
                handler = signal.getsignal(signal.SIGINT)
                assert callable(handler)
                handler(signal.SIGINT, frame)  # raises here, or delivers to the main task
        return self._line


async def _ki_scenario(db_path: str, acked: list[int], handled: list[int]) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        for _ in range(3):
            await trio.lowlevel.checkpoint()
        handled.append(msg.id)

    with trio.fail_after(HANG):
        async with actors.run_system(db_path, handler=handler, durability="full") as system:

            async def producer(session: str) -> None:
                for i in range(4):
                    acked.append(await system.send(session, i))
                    # Handed in bulk while the next batch commits: an actor
                    # may wait for its reservation (_wait_handoff).
                    acked.extend(await system.send_many([(session, (i, j)) for j in range(5)]))

            async with trio.open_nursery() as nursery:
                for session in ("a", "a", "b"):
                    nursery.start_soon(producer, session)
            await system.drain()
            await system.send("a", "late")  # an idle actor parks for it
            await system.drain()


def _only_keyboard_interrupts(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_keyboard_interrupts(e) for e in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


# Lines counted from the start of the run, over every call of the function:
# the first calls (registration, wait, and after) several times over.
LINES_TRIED = 20


def test_keyboard_interrupt_at_every_line_of_every_parking_function(tmp_path: Path) -> None:
    """Each injection stops the system with KeyboardInterrupt (never TrioInternalError),
    and a restart finds every acknowledged message."""
    tried = 0
    per_function: dict[str, int] = {}
    for code, name in PARKING.items():
        nth = 1
        while nth <= LINES_TRIED:
            db_path = str(tmp_path / f"ki-{tried}.db")
            acked: list[int] = []
            handled: list[int] = []
            injector = _Injector(code, nth)
            previous = sys.gettrace()
            sys.settrace(injector)
            try:
                trio.run(_ki_scenario, db_path, acked, handled)
            except BaseException as exc:
                outcome: BaseException | None = exc
            else:
                outcome = None
            finally:
                sys.settrace(previous)
            if not injector.fired:
                break  # every line this run reaches was tried
            tried += 1
            per_function[name] = per_function.get(name, 0) + 1
            assert outcome is not None and _only_keyboard_interrupts(outcome), (
                f"{name}, line {nth}: {outcome!r}"
            )
            done: list[int] = []

            async def restart(path: str = db_path, done: list[int] = done) -> None:
                async def handler(ctx: actors.Context, msg: actors.Message) -> None:
                    done.append(msg.id)

                async with actors.run_system(path, handler=handler) as system:
                    with trio.fail_after(HANG):
                        await system.drain()

            trio.run(restart)
            assert set(acked) <= set(handled) | set(done), f"{name}, line {nth}"
            nth += 1
    print(f"\nKeyboardInterrupt injected at {tried} points: {per_function}")
    assert tried >= 2 * len(PARKING)


# -- item 8: leaving on an outer timeout ------------------------------------


def _producers(acked: list[int], pause: float) -> Callable[[actors.System, str], Awaitable[None]]:
    async def producer(system: actors.System, session: str) -> None:
        i = 0
        while True:
            acked.append(await system.send(session, i))
            if i % 3 == 0:
                acked.extend(await system.send_many([(session, i), (session, i)]))
            i += 1
            if pause and i % 4 == 0:
                await trio.sleep(pause)

    return producer


async def _handled(db_path: str, handled: list[int]) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append(msg.id)

    async with actors.run_system(db_path, handler=handler) as system:
        await drain(system)


@pytest.mark.parametrize("producers", [1, 3])
async def test_outer_cancel_with_producers_in_flight_ends_quietly(
    db_path: str, clock: object, producers: int
) -> None:
    """The outer scope is cancelled (as a timeout does) at each scheduling step of a
    start, a burst of sends and a stop: the block ends quietly; nothing acked is lost."""
    handled: list[int] = []
    acked: list[int] = []
    producer = _producers(acked, 0)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.lowlevel.checkpoint()
        handled.append(msg.id)

    async def cancel_at(scope: trio.CancelScope, steps: int) -> None:
        for _ in range(steps):
            await trio.lowlevel.checkpoint()
        scope.cancel()

    for steps in range(60):
        with trio.CancelScope() as scope:
            async with (
                actors.run_system(db_path, handler=handler) as system,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(cancel_at, scope, steps)
                for p in range(producers):
                    nursery.start_soon(producer, system, f"s{p}")
        assert scope.cancelled_caught
    await _handled(db_path, handled)
    assert set(acked) <= set(handled)


@pytest.mark.parametrize("producers", [1, 3, 8])
async def test_outer_timeout_with_producers_in_flight_ends_quietly(
    db_path: str, producers: int
) -> None:
    """``with move_on_after(t): async with run_system(...)`` with producers awaiting
    send() (the real clock: the store's committer): the block ends with the timeout."""
    handled: list[int] = []
    acked: list[int] = []
    producer = _producers(acked, 0.0001)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.lowlevel.checkpoint()
        handled.append(msg.id)

    for k in range(30):
        with trio.move_on_after(k * 0.0005) as scope:
            async with (
                actors.run_system(db_path, handler=handler) as system,
                trio.open_nursery() as nursery,
            ):
                for p in range(producers):
                    nursery.start_soon(producer, system, f"s{p}")
                await trio.sleep_forever()
        assert scope.cancelled_caught
    await _handled(db_path, handled)
    assert set(acked) <= set(handled)


# -- item 9: waits a handler can never see the end of -----------------------


async def _drain_in_child_task(ctx: actors.Context) -> None:
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.system.drain)
    except BaseExceptionGroup as group:  # (the one error, for the test to match)
        raise group.exceptions[0] from None


SELF_WAITS = [
    pytest.param(lambda ctx: ctx.system.drain(), id="drain"),
    pytest.param(lambda ctx: ctx.system.ask(ctx.session_id, "inner"), id="ask-own-session"),
    pytest.param(
        lambda ctx: ctx.system.ask(ctx.session_id, "inner", timeout=None), id="ask-no-timeout"
    ),
    pytest.param(_drain_in_child_task, id="drain-in-a-child-task"),
]


@pytest.mark.parametrize("wait", SELF_WAITS)
async def test_handler_waiting_for_itself_is_refused_at_once(
    db_path: str, clock: object, wait: Any
) -> None:
    """RuntimeError at the call, whatever handler_timeout is (None here: it hung forever)."""
    errors: list[BaseException] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "outer" and msg.attempt == 1:
            try:
                await wait(ctx)
            except BaseException as exc:
                errors.append(exc)
                raise

    async with actors.run_system(
        db_path,
        handler=handler,
        handler_timeout=None,
        retry_backoff=actors.Backoff(initial=0.001, jitter=0),
    ) as system:
        with pytest.raises(RuntimeError, match="would wait for") as info, trio.fail_after(HANG):
            await system.ask("s", "outer")
        await drain(system)
    assert [type(e) for e in errors] == [RuntimeError]
    assert "session 's'" in str(info.value)


async def test_handler_may_ask_another_session_and_drain_outside(
    db_path: str, clock: object
) -> None:
    """What is not a wait for itself still works: ask() of another session from a handler."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == "outer":
            return await ctx.system.ask("other", "inner")
        return f"inner of {ctx.session_id}"

    async with actors.run_system(db_path, handler=handler) as system:
        assert await system.ask("s", "outer") == "inner of other"
        await drain(system)


# -- subscriptions are trio channels ---------------------------------------


async def _take(channel: trio.abc.ReceiveChannel[Any], count: int) -> list[Any]:
    """Code written for any trio receive channel."""
    return [await channel.receive() for _ in range(count)]


async def test_subscription_is_a_trio_receive_channel(db_path: str, clock: object) -> None:
    """receive() waits for outputs; EndOfChannel once the system stopped and the buffer
    is read; ClosedResourceError once closed; async for and async with as before."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        await ctx.emit(("emitted", msg.body))
        return ("returned", msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        sub = system.subscribe("s")
        closed = system.subscribe("s")
        ended = system.subscribe("s")
        assert isinstance(sub, trio.abc.ReceiveChannel)
        await system.send("s", 1)
        assert await _take(sub, 2) == [("emitted", 1), ("returned", 1)]
        with pytest.raises(trio.WouldBlock):
            sub.receive_nowait()
        await closed.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await closed.receive()
        async with sub:
            await system.send("s", 2)
            async for item in sub:
                assert item == ("emitted", 2)
                break
            assert await sub.receive() == ("returned", 2)
        assert sub.statistics().closed
        await drain(system)
    # The system stopped: what is buffered, then the end of the channel.
    assert [await ended.receive() for _ in range(4)] == [
        ("emitted", 1),
        ("returned", 1),
        ("emitted", 2),
        ("returned", 2),
    ]
    with pytest.raises(trio.EndOfChannel):
        await ended.receive()
    with pytest.raises(trio.EndOfChannel):
        ended.receive_nowait()


async def test_events_subscription_receive(db_path: str, clock: object) -> None:
    """events() is a channel too: receive() waits for the next status event."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(db_path, handler=handler) as system:
        events = system.events()
        await system.send("s", 1)
        kinds = []
        while "actor_started" not in kinds:  # (a "backlog" snapshot may come first)
            event = await events.receive()
            kinds.append(event.kind)
        assert event.session_id == "s"
        assert set(kinds) <= {"backlog", "actor_started"}
    with pytest.raises(trio.EndOfChannel):
        while True:
            await events.receive()
