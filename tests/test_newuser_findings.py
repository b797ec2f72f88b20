"""What a new user (and an adversary) broke, trying the library from its docs.

Each test is one finding, minimal and deterministic; each fails on the code
it was written against and states the promise it holds the code to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import apsw
import pytest
import trio
import trio.testing
from click.testing import CliRunner

import actors
from actors._cli import cli
from actors._demo import DemoOptions, run_demo
from actors.testing import fast_options

HANG = 10.0  # seconds after which a wait is a hang


class _ClassRaises(Exception):
    """An exception whose ``__class__`` attribute raises (isinstance() asks it)."""

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise RuntimeError("__class__ raised")


async def test_an_exception_whose_class_attribute_raises_fails_only_its_attempt(
    db_path: str, clock: trio.testing.MockClock | None
) -> None:
    # reference.md (Errors): "Whatever a handler raises, only its attempt
    # fails". describe() (which "never raises") asks isinstance(exc, Reject),
    # and isinstance() reads exc.__class__: the RuntimeError stopped the
    # whole system instead of failing the attempt.
    async def handle(ctx: actors.Context, msg: actors.Message) -> str:
        if msg.body == "bad":
            raise _ClassRaises()
        return "fine"

    async with actors.run_system(db_path, handler=handle, **fast_options(max_attempts=1)) as system:
        await system.send("s", "bad")
        with trio.fail_after(HANG):
            await system.drain()
            assert await system.ask("t", "good") == "fine"  # the system goes on
        [letter] = system.dead_letters()
        assert letter.session_id == "s" and letter.attempts == 1


class _NeedsArgument(actors.Actor):
    def __init__(self, config: object) -> None:
        self.config = config

    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        pass


async def test_an_actor_class_that_cannot_be_built_without_arguments_is_refused(
    tmp_path: Path,
) -> None:
    # run_system checks that handle/started/stopped can take their
    # arguments, but not that the class can be instantiated as the runtime
    # does (with no argument). Accepted, every start of every session fails
    # before a handler runs: no attempt is counted, nothing is ever
    # dead-lettered, and drain() never returns.
    db = str(tmp_path / "app.db")
    with pytest.raises(TypeError):
        async with actors.run_system(db, handler=_NeedsArgument):
            raise AssertionError("an Actor whose __init__ needs an argument was accepted")
    assert os.listdir(tmp_path) == []  # refused before the file is touched


async def test_a_path_with_a_lone_surrogate_is_refused_before_any_file_is_touched(
    tmp_path: Path,
) -> None:
    # reference.md (run_system): "Invalid options, handler and path are
    # rejected before the file is touched"; the command line calls such a
    # path a usage error. run_system created an empty '<name>.db' and
    # '<name>.db.lock', then raised StoreError about a codec.
    db = str(tmp_path / "app-\udcff.db")  # as os.fsdecode makes of a non-UTF-8 name
    with pytest.raises(ValueError):
        async with actors.run_system(db, handler=_noop):
            raise AssertionError("a path SQLite cannot open was accepted")
    assert os.listdir(tmp_path) == []


async def _noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def _stuck(ctx: actors.Context, msg: actors.Message) -> None:
    await trio.sleep_forever()


async def test_the_demo_does_not_run_an_application_s_messages(tmp_path: Path) -> None:
    # `actors demo --db app.db` on an application's database (an operator's
    # slip) ran the demo's chaos handler on the application's pending
    # messages: acknowledged messages acked (deleted) by the wrong handler,
    # and thousands of demo messages and dead letters left in the file.
    # The demo must refuse a database it did not create (it keeps a ledger
    # beside the ones it did), leaving the application's work alone.
    db = str(tmp_path / "app.db")
    async with actors.run_system(db, handler=_stuck, shutdown_timeout=0.01) as system:
        await system.send("orders", {"charge": 10})  # acknowledged, then the app stops
    quick = DemoOptions(
        db=db,
        sessions=1,
        messages=1,
        duration=0,
        seed=1,
        fail_rate=0,
        poison_rate=0,
        hang_rate=0,
        kill_interval=1e6,
    )
    with contextlib.suppress(Exception):  # a refusal, however spelled, is what we want
        await run_demo(quick, out=lambda _: None)
    async with actors.run_system(db, handler=_stuck, shutdown_timeout=0.01) as system:
        stats = system.statistics()
        assert (stats.pending, stats.dead) == (1, 0), stats


def test_actors_health_is_not_healthy_while_the_system_stops(tmp_path: Path) -> None:
    # reference.md: System.health() is unhealthy "also once the system is
    # shutting down", and `actors health` "applies the same rule from
    # another process". During a graceful stop (a deploy's SIGTERM, with
    # a grace of up to 30 s) `actors health` said "healthy: ok", exit 0,
    # and `actors status` "running": the heartbeat does not say stopping.
    db = str(tmp_path / "app.db")
    verdicts: list[dict[str, object]] = []

    def health() -> dict[str, object]:
        result = CliRunner().invoke(cli, ["health", db, "--json"])
        report: dict[str, object] = json.loads(result.output)
        return report

    async def main() -> None:
        busy, finish = trio.Event(), trio.Event()

        async def handle(ctx: actors.Context, msg: actors.Message) -> None:
            busy.set()
            await finish.wait()  # a handler the stop's grace waits for

        async def stop_and_look(system: actors.System) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(system.shutdown, math.inf)
                await trio.sleep(1)  # (virtual) the stop is under way
                assert system.closed
                verdicts.append(await trio.to_thread.run_sync(health))
                finish.set()

        async with (
            trio.open_nursery() as outside,
            actors.run_system(
                db, handler=handle, handler_timeout=None, status_interval=0.1
            ) as system,
        ):
            await system.send("s", 1)
            await busy.wait()
            await trio.sleep(1)  # (virtual) heartbeats are written
            verdicts.append(await trio.to_thread.run_sync(health))
            outside.start_soon(stop_and_look, system)
            await trio.sleep_forever()  # cancelled by shutdown()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    running, stopping = verdicts
    assert running["healthy"] is True, running
    assert stopping["healthy"] is False, stopping


async def test_a_duration_beyond_the_accepted_range_is_a_usage_error(tmp_path: Path) -> None:
    # docs/howto-operate.md: "a duration too long to count ... each is a
    # usage error, exit 2", checked "before anything is read or changed".
    # `--older-than 11575d` (just over the 10**9 s that purge accepts) went
    # to the system (or, none running, took the lock and opened the file)
    # and came back as "error: ValueError: ...", exit 1.
    db = str(tmp_path / "app.db")
    async with actors.run_system(db, handler=_noop):
        pass
    result = await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(cli, ["purge", db, "--dead", "--older-than", "11575d"])
    )
    assert result.exit_code == 2, result.output


async def _fails_with_brackets(ctx: actors.Context, msg: actors.Message) -> None:
    raise ValueError("bad range [/] in pattern")


@pytest.mark.parametrize("command", ["status", "sessions", "dead"])
async def test_the_command_line_shows_session_ids_and_errors_as_text_not_markup(
    tmp_path: Path, command: str
) -> None:
    # Session ids come from producers and errors from handlers; the tables
    # passed them to rich as markup. A session named "[/]", or an error
    # text with "[/]" in it, made status, sessions and dead fail with a
    # raw rich.errors.MarkupError traceback (exit 1): the operator could no
    # longer look at the system. "[bold]vip[/bold]" was shown as "vip", a
    # session that does not exist (the real id hidden from the operator).
    db = str(tmp_path / "app.db")
    async with actors.run_system(db, handler=_fails_with_brackets, max_attempts=1) as system:
        await system.send("[/]", 1)
        await system.send("[bold]vip[/bold]", 1)
        with trio.fail_after(HANG):
            await system.drain()
    result = await trio.to_thread.run_sync(
        lambda: CliRunner().invoke(cli, [command, db], env={"COLUMNS": "200"})
    )
    assert result.exit_code == 0, result.output
    assert "[bold]vip[/bold]" in result.output


async def test_a_state_too_large_for_the_database_fails_only_its_attempt(
    db_path: str, clock: trio.testing.MockClock | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bodies are bounded by max_message_bytes, ctx.state by nothing: a state
    # over SQLite's limit on a value (10**9 bytes by default; lowered here
    # on every connection as it opens, as an SQLite built with a smaller
    # SQLITE_MAX_LENGTH has it, instead of building a gigabyte) made the
    # ack's transaction fail with "string or blob too big", and the whole
    # system stopped with StoreError, every session with it (and again at
    # each restart, while the message is retried); ask() had answered "ok"
    # just before. Like a state json cannot encode, it must fail only its
    # attempt, and an ask must get the error.
    limit = 1_000_000
    monkeypatch.setattr(
        apsw, "connection_hooks", [lambda db: db.limit(apsw.SQLITE_LIMIT_LENGTH, limit)]
    )

    async def handle(ctx: actors.Context, msg: actors.Message) -> str:
        if msg.body == "big":
            ctx.state["log"] = "x" * limit
        else:
            ctx.state["n"] = ctx.state.get("n", 0) + 1
        return "ok"

    options = fast_options(max_attempts=1, max_message_bytes=100_000)
    async with actors.run_system(db_path, handler=handle, **options) as system:
        with trio.fail_after(HANG):
            with pytest.raises(ValueError, match=r"ctx\.state is"):
                await system.ask("s", "big")
            await system.drain()
            assert await system.ask("t", "small") == "ok"  # the system goes on
            assert await system.ask("s", "small") == "ok"  # and the session too
        [letter] = system.dead_letters()  # not acknowledged: its state was not committed
        assert letter.session_id == "s"
        assert "SQLITE_LIMIT_LENGTH" in letter.last_error
    async with actors.run_system(db_path, handler=handle, **options) as system:
        assert system.statistics().pending == 0  # nothing left to fail at the next start


async def test_max_message_bytes_over_what_the_database_stores_is_refused(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With an SQLite built with a smaller limit on a value, a body that
    # max_message_bytes accepts could not be stored: its send's transaction
    # would fail and stop the system. Refused at the start instead.
    monkeypatch.setattr(
        apsw, "connection_hooks", [lambda db: db.limit(apsw.SQLITE_LIMIT_LENGTH, 500_000)]
    )
    with pytest.raises(ValueError, match="max_message_bytes"):
        async with actors.run_system(db_path, handler=_noop, max_message_bytes=1 << 20):
            raise AssertionError("a max_message_bytes the database cannot store was accepted")
