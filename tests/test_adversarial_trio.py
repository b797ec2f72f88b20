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

from typing import Any

import pytest
import trio
import trio.testing

import actors

HANG = 10.0  # seconds (virtual under MockClock) after which a wait is a hang


async def drain(system: actors.System) -> None:
    with trio.fail_after(HANG):  # fail, not hang
        await system.drain()


# -- item 6: a Cancelled that was not for the handler ---------------------


async def _raise_inner_cancelled() -> None:
    saved: BaseException | None = None
    with trio.move_on_after(0):
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            saved = exc
            raise
    assert saved is not None
    raise saved


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
    saved: BaseException | None = None
    with trio.move_on_after(0):
        try:
            await trio.sleep(1)
        except trio.Cancelled as exc:
            saved = exc
            raise
    assert saved is not None
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
    """started() raising one crashes the incarnation (retried); stopped() raising one is ignored."""
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
    assert calls[:3] == ["started", "started", "handle one 1"]
    assert "handle two 1" in calls
    assert "stopped" in calls
