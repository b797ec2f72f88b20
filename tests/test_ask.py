"""System.ask: send a message and wait for its handler's outcome.

``ask`` returns what the handler returned, raises what it raised (or
``HandlerTimeoutError``), waits through kills for the next attempt, raises
``DeadLetteredError`` when the message ran out of attempts without an
exception of the handler's own, and ``AskTimeoutError`` (a ``TimeoutError``)
when no outcome came in time, while the message is still processed.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing

import actors
from actors.testing import fast_options


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


class Refused(Exception):
    pass


async def test_ask_returns_the_handlers_return_value(db_path: str, clock: object) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        ctx.state["total"] = ctx.state.get("total", 0) + msg.body.get("add", 0)
        if msg.body.get("get"):
            return {"total": ctx.state["total"], "id": msg.id}
        if msg.body.get("object"):
            return Refused("a live value: it is never encoded")
        return None

    async with actors.run_system(db_path, handler=handler) as system:
        assert await system.ask("s", {"add": 1}) is None
        # Requests and replies in order with plain sends, as any message.
        await system.send("s", {"add": 2})
        await system.send("s", {"add": 3})
        reply = await system.ask("s", {"get": True})
        assert reply["total"] == 6
        # The second ask goes to an idle actor (claimed on delivery): answered too.
        again = await system.ask("s", {"get": True})
        assert again["total"] == 6 and again["id"] > reply["id"]
        live = await system.ask("s", {"object": True})
        assert isinstance(live, Refused)
        await system.drain()
        assert system.statistics().processed == 6
        assert system._sup.replies == {}  # nothing left waiting


async def test_concurrent_asks_get_their_own_replies(db_path: str, clock: object) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return [ctx.session_id, msg.body, msg.id]

    replies: dict[tuple[str, int], Any] = {}

    async def ask(system: actors.System, session: str, n: int) -> None:
        replies[session, n] = await system.ask(session, n)

    async with (
        actors.run_system(db_path, handler=handler) as system,
        trio.open_nursery() as nursery,
    ):
        for n in range(40):
            nursery.start_soon(ask, system, f"s{n % 5}", n)
    assert len(replies) == 40
    assert all(reply[:2] == [session, n] for (session, n), reply in replies.items())
    assert len({reply[2] for reply in replies.values()}) == 40


async def test_ask_raises_the_handlers_exception(db_path: str, clock: object) -> None:
    attempts: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            raise Refused(f"no to {msg.body}")
        return "yes on a retry"

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        with pytest.raises(Refused, match="no to 7"):
            await system.ask("s", 7)
        # The message itself follows the retry policy; its later outcome is not reported.
        await system.drain()
        stats = system.statistics()
    assert attempts == [1, 2]
    assert stats.processed == 1 and stats.failed_attempts == 1


async def test_ask_raises_the_handlers_exception_also_on_its_last_attempt(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        raise Refused("always")

    async with actors.run_system(db_path, handler=handler, max_attempts=1) as system:
        with pytest.raises(Refused):
            await system.ask("s", 1)
        (letter,) = system.dead_letters()
    assert "Refused: always" in letter.last_error


async def test_ask_of_a_handler_that_times_out_raises_handler_timeout_error(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        await trio.sleep_forever()

    async with actors.run_system(db_path, handler=handler, handler_timeout=5) as system:
        start = trio.current_time()
        with pytest.raises(actors.HandlerTimeoutError):
            await system.ask("s", 1)
        assert trio.current_time() - start == pytest.approx(5)


async def test_ask_with_unencodable_state_raises_type_error(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        ctx.state["bad"] = {1}
        return "never answered: the ack cannot commit"

    async with actors.run_system(db_path, handler=handler, max_attempts=1) as system:
        with pytest.raises(TypeError, match=r"ctx\.state is not JSON-compatible"):
            await system.ask("s", 1)


async def test_ask_times_out_and_the_message_is_still_processed(
    db_path: str, clock: object
) -> None:
    release = trio.Event()
    done: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        await release.wait()
        done.append(msg.id)
        return "too late"

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(actors.AskTimeoutError) as info:
            await system.ask("s", 1, timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, actors.ActorsError)
        assert "still processed" in str(info.value)
        assert system._sup.replies == {}  # the dropped reply is forgotten
        assert system.busy_sessions() == ["s"]
        release.set()
        await system.drain()
        assert len(done) == 1
        assert system.statistics().processed == 1


async def test_ask_through_a_kill_waits_for_the_retry(db_path: str, clock: object) -> None:
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.attempt == 1:
            entered.set()
            await trio.sleep_forever()
        return f"answered on attempt {msg.attempt}"

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        replies: list[Any] = []

        async def ask() -> None:
            replies.append(await system.ask("s", "x"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await entered.wait()
            assert system.kill("s")
        assert replies == ["answered on attempt 2"]


async def test_ask_of_a_message_dead_lettered_by_kills_raises_dead_lettered_error(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        entered.set()
        await trio.sleep_forever()

    async def killer(system: actors.System) -> None:
        nonlocal entered
        for _ in range(2):
            await entered.wait()
            entered = trio.Event()
            assert system.kill("s")

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=2)
    ) as system:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(killer, system)
            with pytest.raises(actors.DeadLetteredError) as info:
                await system.ask("s", "doomed")
        (letter,) = system.dead_letters()
    assert info.value.message_id == letter.id
    assert isinstance(info.value, actors.ActorsError)
    assert str(letter.id) in str(info.value)
    assert "ActorKilledError" in letter.last_error


@pytest.mark.parametrize(
    ("session", "body", "ask_timeout", "error"),
    [
        (42, 1, None, TypeError),
        ("", 1, None, ValueError),
        ("s", {1, 2}, None, TypeError),
        ("s", 1, -1, ValueError),
        ("s", 1, math.nan, ValueError),
        ("s", 1, math.inf, ValueError),
        ("s", 1, "soon", TypeError),
    ],
)
async def test_ask_validates_before_sending(
    db_path: str, session: object, body: object, ask_timeout: object, error: type[Exception]
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(error):
            await system.ask(session, body, timeout=ask_timeout)  # type: ignore[arg-type]
        assert system.statistics().sends == 0


async def test_ask_after_the_system_stopped_raises_system_closed_error(db_path: str) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return msg.body

    async with actors.run_system(db_path, handler=handler) as system:
        assert await system.ask("s", 1) == 1
    with pytest.raises(actors.SystemClosedError):
        await system.ask("s", 2)


async def test_ask_waiting_when_the_system_stops_raises_system_closed_error(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        await trio.sleep_forever()

    outcome: list[BaseException] = []

    async def ask(system: actors.System) -> None:
        try:
            await system.ask("s", 1)
        except actors.SystemClosedError as exc:
            outcome.append(exc)

    with trio.move_on_after(1000):  # (virtual seconds) a hang fails the test
        async with (
            trio.open_nursery() as nursery,
            actors.run_system(db_path, handler=handler, shutdown_timeout=1) as system,
        ):
            nursery.start_soon(ask, system)
            await trio.testing.wait_all_tasks_blocked()
            assert system.busy_sessions() == ["s"]
    assert len(outcome) == 1


@pytest.mark.parametrize("delete", ["abort", "purge"])
async def test_ask_of_a_deleted_message_raises_at_once(
    db_path: str, mock_clock: trio.testing.MockClock, delete: str
) -> None:
    """Deleting the message an ask waits for (abort, purge) answers the asker:
    it will never run."""
    # Virtual time moves only after half a real second with every task
    # blocked: long after the deletion, but a regression ends in the ask's
    # timeout instead of hanging.
    mock_clock.autojump_threshold = 0.5
    release = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == "block":
            await release.wait()
        return msg.body

    outcome: list[BaseException] = []

    async def asker(system: actors.System) -> None:
        try:
            await system.ask("s", "behind", timeout=3)
        except actors.ActorsError as exc:
            outcome.append(exc)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "block")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(asker, system)
            await trio.testing.wait_all_tasks_blocked()
            (msg_id,) = system._sup.replies  # queued behind the blocked message
            if delete == "abort":
                assert await system.abort(msg_id)
            else:  # the blocked message is in flight: only the asked one goes
                assert await system.purge(session_id="s") == 1
        release.set()
        await system.drain()
        assert system.statistics().processed == 1  # the deleted message never ran
    assert len(outcome) == 1
    assert not isinstance(outcome[0], actors.AskTimeoutError), outcome[0]
    assert ("aborted" if delete == "abort" else "purged") in str(outcome[0])


async def test_ask_through_a_testing_wrapper_returns_the_handlers_value(
    db_path: str, autojump_clock: object
) -> None:
    import actors.testing

    async def handler(ctx: actors.Context, msg: actors.Message) -> Any:
        return {"echo": msg.body}

    class Echo(actors.Actor):
        async def handle(self, ctx: actors.Context, msg: actors.Message) -> Any:
            return {"echo": msg.body}

    recorder = actors.testing.Recorder()
    for wrapped in (
        recorder.wrap(handler),
        actors.testing.flaky(handler, rate=0.0, seed=1),
        actors.testing.slow(handler, max_delay=0.01, seed=1),
        recorder.wrap(Echo),
    ):
        async with actors.run_system(db_path, handler=wrapped) as system:
            assert await system.ask("s", 1, timeout=5) == {"echo": 1}, wrapped
