"""Failure paths that must stay bounded and truthful (issue 16, a new user's findings).

An actor whose ``started()`` (or constructor) raises at every start, a
``Reject`` as the events stream tells it, and arguments that a policy must
refuse at once rather than fail on later.
"""

from __future__ import annotations

import json
import random

import apsw
import pytest
import trio
import trio.testing

import actors
from actors.testing import fast_options

HANG = 10.0  # seconds (virtual under MockClock) after which a wait is a hang


class _NeverStarts(actors.Actor):
    handled = 0

    async def started(self, ctx: actors.Context) -> None:
        raise RuntimeError("cannot connect")

    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        type(self).handled += 1


class _NeverBuilt(actors.Actor):
    handled = 0

    def __init__(self) -> None:
        raise OSError("no configuration")

    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        type(self).handled += 1


@pytest.mark.parametrize("cls", [_NeverStarts, _NeverBuilt])
async def test_an_actor_that_fails_at_every_start_ends_its_messages_in_dead_letters(
    db_path: str, clock: trio.testing.MockClock | None, cls: type[actors.Actor]
) -> None:
    # Invariant 5 (no crash loop). A started() (or __init__) that raises at
    # every start restarted the actor with backoff for ever: no attempt was
    # counted (no message had been claimed), nothing was dead-lettered, and
    # drain() never returned. Each failed start now counts against the
    # session's head message, which ends in dead letters after max_attempts
    # with the start's error; an ask gets that error at once.
    async with actors.run_system(db_path, handler=cls, **fast_options(max_attempts=3)) as system:
        first = await system.send("s", 1)
        second = await system.send("s", 2)
        with trio.fail_after(HANG):
            with pytest.raises((RuntimeError, OSError)):
                await system.ask("t", 3)
            await system.drain()
        letters = sorted(system.dead_letters(), key=lambda d: d.id)
        assert [d.id for d in letters if d.session_id == "s"] == [first, second]
        assert all(d.attempts == 3 for d in letters if d.session_id == "s")
        assert (
            "cannot connect" in letters[0].last_error or "no configuration" in letters[0].last_error
        )
        assert cls.handled == 0  # type: ignore[attr-defined]


async def test_a_reject_says_the_actor_stopped_before_the_next_one_starts(
    db_path: str, clock: trio.testing.MockClock | None
) -> None:
    # A Reject ends its actor's incarnation (the next message gets a fresh
    # instance, after stopped()), but events() showed no actor_stopped or
    # actor_restarted between the two actor_started of the session.
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "no":
            raise actors.Reject("not wanted")

    async with actors.run_system(db_path, handler=handle, **fast_options()) as system:
        kinds: list[tuple[str, str]] = []
        async with system.events() as events:
            await system.send("s", "no")
            await system.send("s", "yes")
            with trio.fail_after(HANG):
                await system.drain()
                async for event in events:
                    if event.session_id == "s":
                        kinds.append((event.kind, event.detail.split(":")[0]))
                    if event.kind == "actor_started" and len(kinds) > 1:
                        break
    assert kinds[:4] == [
        ("actor_started", ""),
        ("actor_stopped", "rejected"),
        ("dead_lettered", "rejected by the handler"),
        ("actor_started", ""),
    ], kinds


@pytest.mark.parametrize("rng", [5, "seed", object(), random])
def test_backoff_delay_refuses_an_rng_that_is_not_a_random(rng: object) -> None:
    # Backoff().delay(2, rng=5) raised AttributeError ('int' object has no
    # attribute 'random') instead of the TypeError every argument gets.
    with pytest.raises(TypeError, match=r"rng must be a random\.Random"):
        actors.Backoff().delay(2, rng=rng)  # type: ignore[arg-type]
    assert 0 < actors.Backoff().delay(2, rng=random.Random(1)) <= 2.0


async def test_an_ask_is_answered_once_the_ack_has_committed(db_path: str) -> None:
    # (Real clock: the store's committer runs the ack's transaction apart.)
    # ask() returned the handler's result as soon as it returned, while its
    # ack (and the state and outbox it commits) was still queued: an "ok"
    # that a store failure a moment later made untrue (the system stopped,
    # and the message ran again at the next start). The reply now waits for
    # the ack's commit: what ask() returns is durable.
    async def handle(ctx: actors.Context, msg: actors.Message) -> int:
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return int(ctx.state["n"])

    def committed() -> object:
        db = apsw.Connection(db_path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            row = db.execute("SELECT value FROM state WHERE session_id = 's'").fetchone()
        finally:
            db.close()
        return None if row is None else json.loads(row[0])["n"]

    async with actors.run_system(db_path, handler=handle) as system:
        with trio.fail_after(HANG):
            for n in range(1, 6):
                assert await system.ask("s", n) == n
                assert committed() == n  # read at once, before anything else runs
