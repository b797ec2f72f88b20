"""ctx.state: durable per-session state, committed in the transaction of the ack.

A handler's changes to ``ctx.state`` are written with the acknowledgement of
its message, or not at all: a failed attempt (an exception, a timeout, a
kill, a state that cannot be encoded) leaves the state as it was before the
message, and the retry applies the message once. The state survives
passivation and a restart of the system, and an ``Actor``'s ``started()``
sees it.

Tests that depend on how the store runs SQLite (each operation inline
under ``MockClock``, group transactions by the store's committer on the
real clock) run on both clocks (the ``clock`` fixture).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from dbrows import query

import actors
from actors.testing import fast_options


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


class Boom(Exception):
    pass


def stored_state(db_path: str) -> dict[str, tuple[Any, float]]:
    """``{session: (state, updated_at)}`` as committed in the database."""
    rows = query(db_path, "SELECT session_id, value, updated_at FROM state")
    return {session: (json.loads(value), updated_at) for session, value, updated_at in rows}


def states(db_path: str) -> dict[str, Any]:
    return {session: value for session, (value, _) in stored_state(db_path).items()}


# -- a new session, and where the state lives -----------------------------------


async def test_state_is_an_empty_dict_for_a_new_session(db_path: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        assert type(ctx.state) is dict
        seen.append((ctx.session_id, copy.deepcopy(ctx.state)))
        ctx.state[ctx.session_id] = msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("a", 1)
        await system.send("b", 2)
        await system.send("a", 3)
        await system.drain()
    # Each session starts empty and sees only its own state.
    assert sorted(seen, key=lambda entry: (entry[0], len(entry[1]))) == [
        ("a", {}),
        ("a", {"a": 1}),
        ("b", {}),
    ]
    assert states(db_path) == {"a": {"a": 3}, "b": {"b": 2}}


async def test_state_persists_across_passivation(db_path: str, autojump_clock: object) -> None:
    instances: list[object] = []
    totals: list[int] = []

    class Counter(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            instances.append(self)

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            ctx.state["total"] = ctx.state.get("total", 0) + msg.body
            totals.append(ctx.state["total"])

    async with actors.run_system(db_path, handler=Counter, idle_timeout=5) as system:
        await system.send("s", 1)
        await system.send("s", 2)
        await system.drain()
        await trio.sleep(10)
        assert not system.is_active("s")  # passivated: its instance is gone
        await system.send("s", 3)
        await system.drain()
    assert len(instances) == 2
    assert totals == [1, 3, 6]
    assert states(db_path) == {"s": {"total": 6}}


async def test_state_persists_across_a_restart_of_the_system(db_path: str, clock: object) -> None:
    totals: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        ctx.state["total"] = ctx.state.get("total", 0) + msg.body
        ctx.state.setdefault("bodies", []).append(msg.body)
        totals.append(ctx.state["total"])

    for run in range(3):
        async with actors.run_system(db_path, handler=handler) as system:
            await system.send("s", 10**run)
            await system.drain()
    assert totals == [1, 11, 111]
    assert states(db_path) == {"s": {"total": 111, "bodies": [1, 10, 100]}}


async def test_state_makes_a_json_round_trip_when_it_is_loaded(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(copy.deepcopy(ctx.state))
        if msg.body == "write":
            ctx.state["pair"] = (1, 2)
            ctx.state["by_id"] = {7: "seven"}
            ctx.state["nested"] = {"list": [None, True, 1.5, "é"]}

    async with actors.run_system(db_path, handler=handler, idle_timeout=1) as system:
        await system.send("s", "write")
        await system.drain()
        await trio.sleep(2)  # passivate: the next message loads the state from the database
        assert not system.is_active("s")
        await system.send("s", "read")
        await system.drain()
    assert seen[1] == {
        "pair": [1, 2],
        "by_id": {"7": "seven"},
        "nested": {"list": [None, True, 1.5, "é"]},
    }


async def test_a_session_that_only_reads_its_state_writes_nothing(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "set":
            ctx.state["x"] = 1
        elif msg.body == "same":
            ctx.state["x"] = 1  # the same value: nothing to write
        else:
            assert ctx.state.get("x") in (None, 1)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("reader", "read")
        await system.send("writer", "set")
        await system.drain()
        (_, written_at) = stored_state(db_path)["writer"]
        await trio.sleep(5)
        await system.send("writer", "same")
        await system.send("writer", "read")
        await system.drain()
    stored = stored_state(db_path)
    assert "reader" not in stored
    assert stored["writer"] == ({"x": 1}, written_at)  # not rewritten 5 s later


# -- a failed attempt leaves the state as it was --------------------------------

FAILURES = ["raise", "timeout", "kill", "unencodable"]


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_failed_attempt_leaves_state_as_before_and_its_retry_applies_once(
    db_path: str, clock: object, failure: str
) -> None:
    seen: list[tuple[str, int, dict[str, Any]]] = []
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt, copy.deepcopy(ctx.state)))
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        ctx.state.setdefault("log", []).append(msg.body)
        if msg.body == "b" and msg.attempt == 1:
            if failure == "raise":
                raise Boom("after changing the state")
            if failure == "unencodable":
                ctx.state["bad"] = {1, 2}  # a set is not JSON: the ack cannot commit it
                return
            entered.set()
            await trio.sleep_forever()  # timed out, or killed

    timeout = 0.05 if clock is None else 10
    async with actors.run_system(
        db_path, handler=handler, **fast_options(handler_timeout=timeout)
    ) as system:
        for body in "abc":
            await system.send("s", body)
        if failure == "kill":
            await entered.wait()
            assert system.kill("s")
        await system.drain()
        stats = system.statistics()
    before_b = {"n": 1, "log": ["a"]}
    assert seen == [
        ("a", 1, {}),
        ("b", 1, before_b),
        ("b", 2, before_b),  # the failed attempt's changes are gone
        ("c", 1, {"n": 2, "log": ["a", "b"]}),  # ... and the retry's are there, once
    ]
    assert stats.failed_attempts == 1 and stats.processed == 3 and stats.dead == 0
    assert states(db_path) == {"s": {"n": 3, "log": ["a", "b", "c"]}}


async def test_unencodable_state_fails_the_attempt_with_a_type_error(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        ctx.state["good"] = msg.body
        if msg.body == 2:
            ctx.state["bad"] = float("nan")

    async with actors.run_system(db_path, handler=handler, max_attempts=2) as system:
        await system.send("s", 1)
        bad = await system.send("s", 2)
        await system.send("s", 3)
        await system.drain()
        (letter,) = system.dead_letters()
    assert letter.id == bad and letter.attempts == 2
    assert "TypeError" in letter.last_error
    assert "ctx.state is not JSON-compatible" in letter.last_error
    # The dead message's changes were never committed; the session went on.
    assert states(db_path) == {"s": {"good": 3}}


async def test_assigning_a_new_dict_replaces_the_state(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[dict[str, Any]] = []
    errors: list[Exception] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(copy.deepcopy(ctx.state))
        if msg.body == "replace":
            ctx.state = {"replaced": True}
        elif msg.body == "clear":
            ctx.state = {}
        elif msg.body == "not a dict":
            try:
                ctx.state = [("replaced", False)]  # type: ignore[assignment]
            except TypeError as exc:
                errors.append(exc)
        elif msg.body == "x":
            ctx.state["old"] = msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        for body in ["x", "replace", "not a dict", "check"]:
            await system.send("s", body)
        await system.drain()
        stored_before_clear = states(db_path)
        await system.send("s", "clear")
        await system.drain()
    # x, replace, not a dict (refused: nothing changed), check, clear
    assert seen == [{}, {"old": "x"}, {"replaced": True}, {"replaced": True}, {"replaced": True}]
    assert len(errors) == 1 and "must be a dict" in str(errors[0])
    assert stored_before_clear == {"s": {"replaced": True}}
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "check")
        await system.drain()
    assert seen[-1] == {}  # the cleared state was committed
    assert states(db_path) == {"s": {}}


# -- Actor.started --------------------------------------------------------------


async def test_state_is_loaded_before_started(db_path: str, autojump_clock: object) -> None:
    at_start: list[dict[str, Any]] = []

    class Counter(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            at_start.append(copy.deepcopy(ctx.state))

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            ctx.state["n"] = ctx.state.get("n", 0) + 1
            if msg.body == "crash" and msg.attempt == 1:
                raise Boom("after changing the state")

    async with actors.run_system(db_path, handler=Counter, **fast_options()) as system:
        await system.send("s", "ok")
        await system.send("s", "ok")
        await system.send("s", "crash")
        await system.drain()
    async with actors.run_system(db_path, handler=Counter) as system:
        await system.send("s", "ok")
        await system.drain()
    # New session; restarted after the crash (the crashed attempt's change is
    # not there); a new run of the system.
    assert at_start == [{}, {"n": 2}, {"n": 3}]
    assert states(db_path) == {"s": {"n": 4}}


async def test_changes_made_in_started_are_committed_with_the_next_ack(
    db_path: str, autojump_clock: object
) -> None:
    # (Issue 16: they were thrown away, and with them a reference kept from
    # started(); the state is now one dict from started() on.)
    class Marks(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            ctx.state["incarnations"] = ctx.state.get("incarnations", 0) + 1

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            pass

    for run in (1, 2):
        async with actors.run_system(db_path, handler=Marks) as system:
            await system.send("s", run)
            await system.drain()
        assert states(db_path) == {"s": {"incarnations": run}}


async def test_changes_made_in_started_are_seen_but_not_those_of_stopped(
    db_path: str, autojump_clock: object
) -> None:
    # A handler that writes the state too: started()'s changes ride along
    # with its ack and are visible to it; stopped()'s never commit (no ack
    # follows them).
    seen: list[dict[str, Any]] = []

    class Hooks(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            ctx.state["from_started"] = ctx.state.get("from_started", 0) + 1

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            seen.append(copy.deepcopy(ctx.state))
            ctx.state["n"] = ctx.state.get("n", 0) + 1

        async def stopped(self, ctx: actors.Context) -> None:
            ctx.state["from_stopped"] = True

    for _ in range(2):  # the second run loads what the first committed
        async with actors.run_system(db_path, handler=Hooks, idle_timeout=1) as system:
            await system.send("s", 1)
            await system.drain()
            await trio.sleep(2)  # passivate: stopped() runs
            assert not system.is_active("s")
    assert seen == [{"from_started": 1}, {"from_started": 2, "n": 1}]
    assert states(db_path) == {"s": {"from_started": 2, "n": 2}}


async def test_state_outside_a_handler_before_it_is_loaded_raises(db_path: str) -> None:
    ctx = actors.Context("s", None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"ctx\.state"):
        ctx.state  # noqa: B018 - the property access is the test


# -- property: a counter is exact under random failures -------------------------

# What an attempt does after adding its value to the state: fail (several
# ways), or (past its plan) succeed.
ACTIONS = ["raise", "hang", "unencodable", "raise-before"]


async def _run_counter(path: str, messages: list[tuple[int, int, list[str]]]) -> None:
    # {session: [(message index, attempt, total seen at the start)]}
    starts: dict[int, list[tuple[int, int, int]]] = {}

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        index, value, plan = msg.body
        total = ctx.state.get("total", 0)
        starts.setdefault(int(ctx.session_id), []).append((index, msg.attempt, total))
        action = plan[msg.attempt - 1] if msg.attempt <= len(plan) else "ok"
        if action == "raise-before":
            raise Boom(action)
        ctx.state["total"] = total + value
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        if action == "raise":
            raise Boom(action)
        if action == "hang":
            await trio.sleep_forever()  # until handler_timeout
        if action == "unencodable":
            ctx.state["oops"] = object()

    async with actors.run_system(
        path, handler=handler, **fast_options(handler_timeout=1, max_attempts=5)
    ) as system:
        for index, (session, value, plan) in enumerate(messages):
            await system.send(str(session), [index, value, plan])
        await system.drain()
        stats = system.statistics()
    failures = sum(len(plan) for _, _, plan in messages)
    assert stats.processed == len(messages) and stats.dead == 0
    assert stats.failed_attempts == failures
    expected: dict[str, dict[str, int]] = {}
    for session, value, _ in messages:
        s = expected.setdefault(str(session), {"total": 0, "n": 0})
        s["total"] += value
        s["n"] += 1
    assert states(path) == expected
    # Every attempt saw exactly the sum of the messages before it in its session.
    for session, attempts in starts.items():
        mine = [(i, v, p) for i, (s, v, p) in enumerate(messages) if s == session]
        expected_starts = []
        total = 0
        for index, value, plan in mine:
            expected_starts += [(index, attempt, total) for attempt in range(1, len(plan) + 2)]
            total += value
        assert attempts == expected_starts


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    messages=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.integers(-(10**9), 10**9),
            st.lists(st.sampled_from(ACTIONS), max_size=3),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_counter_state_is_exact_under_random_failures(
    messages: list[tuple[int, int, list[str]]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(
            _run_counter,
            str(Path(tmp) / "actors.db"),
            messages,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
