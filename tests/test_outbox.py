"""ctx.send: a transactional outbox, committed with the ack of the message being handled.

A message sent with ``ctx.send`` is inserted in the transaction that deletes
the handled message (and writes its state): if the attempt fails, nothing is
sent; a redelivered message that succeeds sends once. ``ctx.system.send``,
by contrast, sends at once, whatever the handler does next.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import trio
import trio.testing
from dbrows import query

import actors
from actors.testing import fast_options, quiescent


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


class Boom(Exception):
    pass


def rows(db_path: str) -> list[tuple[int, str, Any]]:
    found = query(db_path, "SELECT id, session_id, body FROM messages ORDER BY id")
    return [(i, s, json.loads(b)) for i, s, b in found]


async def test_ctx_send_delivers_after_the_handled_message_is_acked(
    db_path: str, autojump_clock: object
) -> None:
    events: list[str] = []
    handled: list[actors.Message] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append(msg)
        if ctx.session_id == "a":
            ctx.send("b", {"from": msg.id})
            await trio.testing.wait_all_tasks_blocked()
            # Nothing is sent before the handler returns: b has no message yet.
            assert rows(db_path) == [(msg.id, "a", msg.body)]
            await trio.sleep(3)
            events.append("a returns")
        else:
            events.append("b runs")

    async with actors.run_system(db_path, handler=handler) as system:
        a_id = await system.send("a", "go")
        await quiescent(system)
    assert events == ["a returns", "b runs"]
    a, b = handled
    assert b.body == {"from": a_id} and b.attempt == 1 and b.id > a_id
    # Enqueued when ctx.send was called, not 3 s later when it was committed.
    assert b.enqueued_at == pytest.approx(a.enqueued_at, abs=0.5)
    assert rows(db_path) == []


@pytest.mark.parametrize("failure", ["raise", "timeout", "kill", "unencodable state"])
async def test_a_failed_attempt_sends_nothing_and_its_retry_sends_once(
    db_path: str, clock: object, failure: str
) -> None:
    received: list[tuple[Any, int]] = []
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "b":
            received.append((msg.body, msg.attempt))
            return
        ctx.send("b", [msg.body, msg.attempt])
        ctx.state["attempts"] = msg.attempt
        if msg.attempt == 1:
            if failure == "raise":
                raise Boom("after ctx.send")
            if failure == "unencodable state":
                ctx.state["bad"] = object()
                return
            entered.set()
            await trio.sleep_forever()

    timeout = 0.05 if clock is None else 10
    async with actors.run_system(
        db_path, handler=handler, **fast_options(handler_timeout=timeout)
    ) as system:
        await system.send("a", "x")
        if failure == "kill":
            await entered.wait()
            assert system.kill("a")
        stats = await quiescent(system)
    # Only the attempt that was acked sent anything, and only once.
    assert received == [(["x", 2], 1)]
    assert stats.failed_attempts == 1 and stats.processed == 2


async def test_a_message_that_ends_in_dead_letters_sends_nothing(
    db_path: str, autojump_clock: object
) -> None:
    received: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "b":
            received.append(msg.body)
            return
        ctx.send("b", [msg.body, msg.attempt])
        if msg.body == "poison":
            raise Boom("every attempt fails after ctx.send")

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=3)
    ) as system:
        poison = await system.send("a", "poison")
        await system.send("a", "fine")
        stats = await quiescent(system)
        assert [d.id for d in system.dead_letters()] == [poison]
    # Three attempts called ctx.send; none was acked, so none sent.
    assert received == [["fine", 1]]
    assert (stats.failed_attempts, stats.dead, stats.processed) == (3, 1, 2)
    assert rows(db_path) == [(poison, "a", "poison")]


async def test_await_ctx_send_and_plain_ctx_send_both_send(
    db_path: str, autojump_clock: object
) -> None:
    received: list[Any] = []
    results: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "b":
            received.append(msg.body)
            return
        ctx.send("b", "plain")
        results.append(await ctx.send("b", "awaited"))
        ctx.send("b", b"\x00bytes")

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("a", None)
        await quiescent(system)
    assert received == ["plain", "awaited", b"\x00bytes"]  # in the order sent
    assert results == [None]


async def test_ctx_send_to_its_own_session_goes_to_the_back_of_the_queue(
    db_path: str, autojump_clock: object
) -> None:
    order: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        order.append(msg.body)
        if msg.body == 1:
            ctx.send(ctx.session_id, "follow-up of 1")

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send_many([("s", 1), ("s", 2)])
        await quiescent(system)
    assert order == [1, 2, "follow-up of 1"]


async def test_ctx_system_send_is_not_transactional(db_path: str, autojump_clock: object) -> None:
    # The contrast: ctx.system.send commits at once, so a failed attempt
    # that used it has already sent, and its retry sends again.
    received: list[tuple[str, Any]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "b":
            received.append((msg.body[0], msg.body[1]))
            return
        await ctx.system.send("b", ["system.send", msg.attempt])
        ctx.send("b", ["ctx.send", msg.attempt])
        if msg.attempt == 1:
            raise Boom

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        await system.send("a", "x")
        await quiescent(system)
    assert sorted(received) == [("ctx.send", 2), ("system.send", 1), ("system.send", 2)]


async def test_outbox_is_durable_across_a_restart(db_path: str, autojump_clock: object) -> None:
    received: list[Any] = []
    hold_b = True
    b_entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "a":
            ctx.send("b", msg.body)
        elif hold_b:
            b_entered.set()
            await trio.sleep_forever()  # still running when the system stops
        else:
            received.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler, shutdown_timeout=1) as system:
        await system.send("a", "forwarded")
        await b_entered.wait()
        assert system.busy_sessions() == ["b"]
    assert [(s, b) for _, s, b in rows(db_path)] == [("b", "forwarded")]
    hold_b = False
    async with actors.run_system(db_path, handler=handler) as system:
        await quiescent(system)
    assert received == [("forwarded", 2)]  # its first attempt was cut short by the stop


async def test_ctx_send_validates_like_system_send(db_path: str, autojump_clock: object) -> None:
    errors: list[tuple[str, type[BaseException]]] = []
    received: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "b":
            received.append(msg.body)
            return
        cases: list[tuple[str, object, object]] = [
            ("session not a str", 42, 1),
            ("empty session", "", 1),
            ("session too long", "x" * 257, 1),
            ("session with NUL", "a\x00b", 1),
            ("unencodable body", "b", {1, 2}),
            ("NaN body", "b", float("nan")),
            ("body too large", "b", "x" * 200),
        ]
        for name, session, body in cases:
            try:
                ctx.send(session, body)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                errors.append((name, type(exc)))
        ctx.send("b", "valid")  # the refused sends did not spoil the outbox

    async with actors.run_system(db_path, handler=handler, max_message_bytes=100) as system:
        await system.send("a", "x")
        stats = await quiescent(system)
    assert errors == [
        ("session not a str", TypeError),
        ("empty session", ValueError),
        ("session too long", ValueError),
        ("session with NUL", ValueError),
        ("unencodable body", TypeError),
        ("NaN body", TypeError),
        ("body too large", actors.MessageTooLargeError),
    ]
    assert received == ["valid"]
    assert stats.failed_attempts == 0 and stats.processed == 2


async def test_ctx_send_outside_handle_raises_runtime_error(
    db_path: str, autojump_clock: object
) -> None:
    errors: list[str] = []
    kept: list[actors.Context] = []

    class Sender(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            try:
                ctx.send("b", "from started")
            except RuntimeError as exc:
                errors.append("started: " + str(exc))

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            kept.append(ctx)

        async def stopped(self, ctx: actors.Context) -> None:
            try:
                ctx.send("b", "from stopped")
            except RuntimeError:
                errors.append("stopped")

    async with actors.run_system(db_path, handler=Sender, idle_timeout=1) as system:
        await system.send("a", 1)
        await quiescent(system, passivated=True)
        # A context kept after its handler returned.
        with pytest.raises(RuntimeError, match=r"ctx\.system\.send"):
            kept[0].send("b", "later")
        assert system.statistics().sends == 1
    assert len(errors) == 2
    assert errors[0].startswith("started: ctx.send() commits with the ack")
    assert errors[1] == "stopped"
    assert rows(db_path) == []


async def test_state_and_outbox_commit_together(db_path: str, autojump_clock: object) -> None:
    # Each hop adds itself to the path and forwards: a -> b -> c. Its state
    # counts the messages it forwarded; it must agree with what arrived.
    arrived: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        path = [*msg.body, ctx.session_id]
        if ctx.session_id == "c":
            arrived.append(path)
            return
        ctx.state["forwarded"] = ctx.state.get("forwarded", 0) + 1
        ctx.send(chr(ord(ctx.session_id) + 1), path)
        if msg.attempt == 1 and len(arrived) % 2 == 0:
            raise Boom("every other first attempt fails")

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        for _ in range(6):
            await system.send("a", [])
        stats = await quiescent(system)
    assert arrived == [["a", "b", "c"]] * 6
    state = dict(query(db_path, "SELECT session_id, value FROM state"))
    assert {s: json.loads(v) for s, v in state.items()} == {
        "a": {"forwarded": 6},
        "b": {"forwarded": 6},
    }
    assert stats.failed_attempts > 0


async def test_drain_waits_for_messages_sent_with_ctx_send(db_path: str, clock: object) -> None:
    received: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id == "a":
            ctx.send("b", copy.deepcopy(msg.body))
        else:
            received.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("a", "x")
        await system.drain()
        stats = system.statistics()
    assert stats.pending == 0
    assert received == ["x"]
