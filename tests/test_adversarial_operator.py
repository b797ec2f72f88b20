"""What an operator's tools show and refuse: hostile text, odd paths, the wrong database.

- Session ids (from producers) and error texts (from handlers) are data:
  the command line shows them as plain text, never as rich markup, and
  makes every control character visible (a terminal escape sequence or a
  newline in them never reaches the terminal raw).
- ``actors health`` and ``status`` say the system is stopping while it runs
  out a graceful stop's grace, as ``System.health()`` does.
- A duration beyond what the library accepts is a usage error (exit 2).
- ``dead`` and ``sessions`` say how many there are when ``--limit`` shows fewer.
- The demo runs only on a database it created, and its progress counts
  this run's dead letters apart from earlier runs'.
- A path that cannot be a database file (not UTF-8, a directory, a name
  ending in a separator) is refused before any file is created.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import apsw
import attrs
import pytest
import trio
import trio.testing
from click.testing import CliRunner, Result
from helpers import heartbeat_fields

import actors
from actors._cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, cli, visible
from actors._demo import DemoDatabaseError, DemoOptions, Snapshot, run_demo
from actors._health import Heartbeat

HANG = 10.0  # seconds after which a wait is a hang


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "250"})


async def ainvoke(*args: str) -> Result:
    return await trio.to_thread.run_sync(lambda: invoke(*args))


async def nothing(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def fail_with_the_body(ctx: actors.Context, msg: actors.Message) -> None:
    raise ValueError(msg.body)


# -- user data is text -------------------------------------------------------------------


def test_visible_escapes_what_a_terminal_would_act_on() -> None:
    assert visible("orders-7") == "orders-7"
    assert visible("[bold]vip[/bold] :smile:") == "[bold]vip[/bold] :smile:"
    assert visible("C:\\path") == "C:\\path"  # printable: as it is
    assert visible("a\x1b[31mred") == "a\\x1b[31mred"
    assert visible("two\nlines\r\t") == "two\\nlines\\r\\t"
    assert visible("\x9b31m\x7f\x00") == "\\x9b31m\\x7f\\x00"  # C1 CSI, DEL, NUL
    assert visible("\u202eevil\u200b") == "\\u202eevil\\u200b"  # bidi override, zero width
    assert visible("line\u2028sep") == "line\\u2028sep"
    assert visible("lone \udcff") == "lone \\udcff"
    # With an escape in it, a backslash is doubled: "\n" typed is not a newline.
    assert visible("a\\nb\n") == "a\\\\nb\\n"


HOSTILE = "s\x1b[31mred\x1b[0m\nforged line"
ERROR = "boom \x1b]0;title\x07 [/] [bold]x[/bold]\r\x1b[2K"


async def hostile_database(path: str) -> None:
    async with actors.run_system(path, handler=fail_with_the_body, max_attempts=1) as system:
        await system.send(HOSTILE, ERROR)
        await system.send(":smile:", "fine")
        await system.send("[red]x[/]", "also")
        with trio.fail_after(HANG):
            await system.drain()


@pytest.mark.parametrize("command", ["status", "sessions", "dead"])
async def test_escapes_and_newlines_in_ids_and_errors_never_reach_the_terminal(
    tmp_path: Path, command: str
) -> None:
    db = str(tmp_path / "app.db")
    await hostile_database(db)
    result = await ainvoke(command, db)
    assert result.exit_code == EXIT_OK, result.output
    out = result.output
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "forged line" not in out.split("\n")[0]
    assert not any(line.startswith("forged line") for line in out.splitlines())
    assert visible(HOSTILE) in out  # the id, every character shown
    assert ":smile:" in out and "[red]x[/]" in out  # no emoji codes, no markup
    if command == "dead":
        assert "boom \\x1b]0;title\\x07 [/] [bold]x[/bold]\\r\\x1b[2K" in out
    # --json keeps the exact text, for scripts.
    data = json.loads((await ainvoke(command, db, "--json")).output)
    rows = data["sessions"] if command == "status" else data
    assert HOSTILE in {row["session_id"] for row in rows}


async def test_a_path_with_an_escape_is_shown_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "x\x1b[31my"
    folder.mkdir()
    db = str(folder / "app.db")
    async with actors.run_system(db, handler=nothing):
        pass
    for args in (["status", db], ["health", db]):
        result = await ainvoke(*args)
        assert "\x1b" not in result.output, (args, result.output)
        assert "x\\x1b[31my" in result.output, (args, result.output)


# -- a stop is not healthy ---------------------------------------------------------------


def test_status_says_stopping_and_a_restarted_system_does_not_inherit_it(tmp_path: Path) -> None:
    db = str(tmp_path / "app.db")
    seen: dict[str, object] = {}

    async def main() -> None:
        busy, finish = trio.Event(), trio.Event()

        async def handle(ctx: actors.Context, msg: actors.Message) -> None:
            busy.set()
            await finish.wait()

        async def stop_and_look(system: actors.System) -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(system.shutdown, math.inf)
                await trio.testing.wait_all_tasks_blocked()
                seen["status"] = (await ainvoke("status", db)).output
                seen["health"] = await ainvoke("health", db)
                finish.set()

        async with (
            trio.open_nursery() as outside,
            actors.run_system(db, handler=handle, handler_timeout=None) as system,
        ):
            await system.send("s", 1)
            await busy.wait()
            outside.start_soon(stop_and_look, system)
            await trio.sleep_forever()  # cancelled by shutdown()

        # The next system on the file: the last one's "stopping" is not its
        # own. (Asked at once, on this thread: waiting for a thread, the
        # clock would jump to its first heartbeat.)
        async with actors.run_system(db, handler=nothing):
            seen["restarted"] = invoke("health", db, "--json")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    status = str(seen["status"])
    assert "stopping: the system is shutting down" in status, status
    health = seen["health"]
    assert isinstance(health, Result)
    assert health.exit_code == EXIT_FAILED, health.output
    assert health.output.startswith("unhealthy: the system is shutting down"), health.output
    restarted = seen["restarted"]
    assert isinstance(restarted, Result)
    report = json.loads(restarted.output)
    assert report["reason"] == "the running system has written no heartbeat yet", report


def test_a_heartbeat_without_the_stopping_field_still_reads() -> None:
    # Written by an earlier version of actors (a system still running it).
    fields = heartbeat_fields(
        at=1.0, interval=1.0, started_at=0.0, last_progress_at=0.5, pid=7, processed=1
    )
    beat = Heartbeat.from_json(json.dumps(fields))
    assert beat is not None and beat.stopping is False
    assert Heartbeat.from_json(json.dumps({**fields, "stopping": True})) == Heartbeat(
        **fields, stopping=True
    )
    assert Heartbeat.from_json(json.dumps({**fields, "stopping": "yes"})) is None


# -- durations ---------------------------------------------------------------------------


async def test_every_duration_option_refuses_more_than_the_library_accepts(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "app.db")
    async with actors.run_system(db, handler=nothing):
        pass
    too_long = [
        ["purge", db, "--dead", "--older-than", "11575d"],
        ["purge", db, "--dead", "--older-than", "1000000001"],
        ["purge", db, "--dead", "--wait", "1e10"],
        ["retry", db, "--all", "--wait", "1e10"],
        ["abort", db, "--id", "1", "--wait", "1e10"],
        ["health", db, "--stall-after", "1e10"],
        ["health", db, "--stale-after", "1e10"],
        ["demo", "--kill-interval", "1e10"],
    ]
    for args in too_long:
        result = await ainvoke(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Invalid value" in result.output and "error:" not in result.output, result.output
    # The longest accepted one still works.
    result = await ainvoke("purge", db, "--dead", "--older-than", "11574d")
    assert result.exit_code == EXIT_OK, result.output


# -- titles under --limit ----------------------------------------------------------------


async def test_dead_and_sessions_say_how_many_there_are_beyond_the_limit(tmp_path: Path) -> None:
    db = str(tmp_path / "app.db")
    async with actors.run_system(db, handler=fail_with_the_body, max_attempts=1) as system:
        for i in range(5):
            await system.send(f"s{i}", "no")
        with trio.fail_after(HANG):
            await system.drain()
    assert "dead: the 2 oldest of 5" in (await ainvoke("dead", db, "--limit", "2")).output
    assert "dead: 5" in (await ainvoke("dead", db)).output
    assert "dead: 1" in (await ainvoke("dead", db, "--session", "s3", "--limit", "1")).output
    limited = (await ainvoke("sessions", db, "--limit", "3")).output
    assert "sessions: the 3 deepest of 5" in limited, limited
    assert "sessions: 5" in (await ainvoke("sessions", db)).output
    # --json stays a list of what was asked for.
    assert len(json.loads((await ainvoke("dead", db, "--limit", "2", "--json")).output)) == 2


# -- the demo ----------------------------------------------------------------------------


def quick(db: str, **changes: object) -> DemoOptions:
    options = {
        "db": db,
        "sessions": 2,
        "messages": 3,
        "duration": 0,
        "seed": 1,
        "fail_rate": 0,
        "poison_rate": 0,
        "hang_rate": 0,
        "kill_interval": 1e6,
        **changes,
    }
    return DemoOptions(**options)  # type: ignore[arg-type]


async def test_the_demo_refuses_an_application_s_database_and_touches_nothing(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "app.db")
    async with actors.run_system(db, handler=nothing):
        pass  # an application's database, empty now
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DemoDatabaseError, match="not created by the demo"):
        await run_demo(quick(db), out=lambda _: None)
    assert sorted(os.listdir(tmp_path)) == before
    result = await ainvoke("demo", "--db", db, "--sessions", "1", "--messages", "1")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "not created by the demo" in result.output
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("kind", ["directory", "junk", "empty", "other-sqlite", "trailing-slash"])
def test_the_demo_refuses_what_is_no_database_of_its_own_leaving_no_files(
    tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "x.db"
    arg = str(target)
    if kind == "directory":
        target.mkdir()
    elif kind == "junk":
        target.write_text("not a database " * 100)
    elif kind == "empty":
        target.touch()
    elif kind == "other-sqlite":
        conn = apsw.Connection(arg)
        conn.execute("CREATE TABLE orders (id INTEGER)")
        conn.close()
    else:
        arg += "/"
    before = sorted(os.listdir(tmp_path))
    result = invoke("demo", "--db", arg, "--sessions", "1", "--messages", "1")
    assert result.exit_code == EXIT_USAGE, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert sorted(os.listdir(tmp_path)) == before  # no .lock, no .demo-ledger


async def test_the_demo_runs_again_on_its_own_database(tmp_path: Path) -> None:
    db = str(tmp_path / "demo.db")
    first = await run_demo(quick(db), out=lambda _: None)
    second = await run_demo(quick(db, seed=2), out=lambda _: None)
    assert first.ok and second.ok and second.earlier_sent == first.sent


async def test_the_demo_progress_counts_this_run_s_dead_letters_apart(tmp_path: Path) -> None:
    # Every message is poison: each run dead-letters all of its own. The
    # second run's progress said "dead 12" (both runs'), its table 6 and 6.
    db = str(tmp_path / "demo.db")
    options = quick(db, poison_rate=1.0)
    first = await run_demo(options, out=lambda _: None)
    assert first.dead == first.sent == 6
    shown: list[Snapshot] = []
    lines: list[str] = []
    second = await run_demo(attrs.evolve(options, seed=2), out=lines.append, show=shown.append)
    last = shown[-1]  # the final state
    assert (last.dead, last.earlier_dead) == (second.dead, second.earlier_dead) == (6, 6)
    assert min(last.processed + last.dead, last.total) == 6  # the "finished" bar: this run's
    line = last.line()
    this_run, earlier = line.split("| earlier runs:")[0], line.split("| earlier runs:")[1]
    assert "dead    6" in this_run and "dead 6" in earlier, line


# -- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["trailing-slash", "dot", "directory", "nul"])
async def test_a_path_that_is_no_database_file_is_refused_before_anything_is_created(
    tmp_path: Path, kind: str
) -> None:
    if kind == "trailing-slash":
        path = str(tmp_path / "dir") + os.sep  # made a file named "dir"
    elif kind == "dot":
        path = str(tmp_path / "new") + os.sep + "."
    elif kind == "directory":
        (tmp_path / "dir").mkdir()
        path = str(tmp_path / "dir")
    else:
        path = str(tmp_path / "a\x00b.db")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError):
        async with actors.run_system(path, handler=nothing):
            raise AssertionError(f"{path!r} was accepted")
    assert sorted(os.listdir(tmp_path)) == before  # no file, no .lock
    if kind != "nul":  # (a NUL cannot be passed in argv)
        result = await ainvoke("status", path)
        assert result.exit_code == EXIT_USAGE, result.output
    assert sorted(os.listdir(tmp_path)) == before
