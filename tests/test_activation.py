"""Activation without a claim or a new task: a session's first messages are
handed to its new actor at insert, a parked actor's slot and task go to the
next session at once (eviction), and a task that served one session serves
the next in a fresh ``contextvars`` context."""

from __future__ import annotations

import contextvars
from typing import Any, ClassVar

import trio
import trio.testing

import actors

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


class Seen:
    """A handler that records, per session, the task, the context variable it
    found, and then sets it to the session's id (as a careless handler would)."""

    def __init__(self) -> None:
        self.tasks: dict[str, trio.lowlevel.Task] = {}
        self.found: dict[str, list[str]] = {}

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.tasks[ctx.session_id] = trio.lowlevel.current_task()
        self.found.setdefault(ctx.session_id, []).append(VAR.get())
        VAR.set(ctx.session_id)


async def _one_by_one(system: actors.System, sessions: list[str]) -> None:
    for session_id in sessions:
        await system.send(session_id, {"n": 1})
        await system.drain()


async def test_a_parked_actor_gives_its_slot_and_task_to_the_next_session(
    db_path: str,
) -> None:
    seen = Seen()
    token = VAR.set("the system's")
    try:
        async with actors.run_system(db_path, handler=seen, max_active=1) as system:
            await _one_by_one(system, ["a", "b", "c"])
            stats = system.statistics()
    finally:
        VAR.reset(token)
    # One slot: each new session took the parked actor's slot, in its task.
    assert seen.tasks["a"] is seen.tasks["b"] is seen.tasks["c"]
    # ...and each ran in a fresh copy of the context the system was opened
    # in: never the value the previous session's handler set.
    assert seen.found == {"a": ["the system's"], "b": ["the system's"], "c": ["the system's"]}
    assert stats.active_actors == 1
    assert stats.processed == 3


async def test_a_session_that_comes_back_runs_in_a_fresh_context_too(db_path: str) -> None:
    seen = Seen()
    async with actors.run_system(db_path, handler=seen, max_active=1) as system:
        await _one_by_one(system, ["a", "b", "a"])
    assert seen.found == {"a": ["unset", "unset"], "b": ["unset"]}


class Hooked(actors.Actor):
    """An actor with a stopped() hook: its slot is not taken before the hook ran."""

    log: ClassVar[list[str]] = []

    async def started(self, ctx: actors.Context) -> None:
        self.log.append(f"started {ctx.session_id} {VAR.get()}")

    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.log.append(f"handle {ctx.session_id} {VAR.get()}")
        VAR.set(ctx.session_id)

    async def stopped(self, ctx: actors.Context) -> None:
        self.log.append(f"stopped {ctx.session_id}")


async def test_an_actor_with_a_stopped_hook_stops_before_its_slot_is_reused(
    db_path: str,
) -> None:
    Hooked.log = []
    async with actors.run_system(db_path, handler=Hooked, max_active=1) as system:
        await _one_by_one(system, ["a", "b"])
    assert Hooked.log == [
        "started a unset",
        "handle a unset",
        "stopped a",
        "started b unset",
        "handle b unset",
        "stopped b",
    ]


async def test_a_new_session_is_handed_its_first_messages_without_a_claim(
    db_path: str,
) -> None:
    seen = Seen()
    async with actors.run_system(db_path, handler=seen, max_active=2) as system:
        await _one_by_one(system, ["a", "b", "c", "d"])
        handoffs = system._router.handoffs
    # Every first message was inserted claimed for a new (or evicted-into)
    # actor: a handoff each, no claim of its own.
    assert handoffs == 4
    assert sorted(seen.found) == ["a", "b", "c", "d"]


async def test_a_hard_stop_while_a_successor_waits_releases_its_messages(
    db_path: str,
) -> None:
    """The successor of an evicted actor is registered and handed its message
    before the evicted task runs it; a hard stop right after the send gives
    the message back if it had not started (its attempt too), and the next
    start runs it: once, at its first attempt, either way."""
    ran: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        ran.append((ctx.session_id, msg.attempt))

    async with actors.run_system(db_path, handler=handler, max_active=1) as system:
        await _one_by_one(system, ["a"])
        await system.send("b", {"n": 1})
        await system.shutdown(grace=0)
    async with actors.run_system(db_path, handler=handler, max_active=1) as system:
        await system.drain()
        dead = system.dead_letters()
    assert ran.count(("a", 1)) == 1
    assert [r for r in ran if r[0] == "b"] in ([("b", 1)],)
    assert dead == []


async def test_many_sessions_through_few_slots_lose_nothing(db_path: str) -> None:
    counts: dict[str, int] = {}

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        counts[ctx.session_id] = counts.get(ctx.session_id, 0) + 1
        if msg.body["n"] % 7 == 0:
            await trio.lowlevel.checkpoint()

    sends: list[tuple[str, Any]] = [(f"s{k % 37}", {"n": k}) for k in range(600)]
    async with actors.run_system(db_path, handler=handler, max_active=3) as system:
        async with trio.open_nursery() as nursery:
            for first in range(0, len(sends), 50):
                nursery.start_soon(system.send_many, sends[first : first + 50])
        await system.drain()
        assert system.statistics().active_actors <= 3
    assert sum(counts.values()) == 600
    assert all(counts[f"s{i}"] == len(range(i, 600, 37)) for i in range(37))


async def test_a_variable_a_handler_sets_lives_as_long_as_its_activation(db_path: str) -> None:
    seen = Seen()
    async with actors.run_system(db_path, handler=seen) as system:
        await system.send_many([("a", {"n": 1}), ("a", {"n": 2})])
        await system.drain()
    assert seen.found == {"a": ["unset", "a"]}
