"""The `actors` command: reads, changes, exit codes, and a real running system.

Most tests drive the click command in-process (CliRunner) on a database that
no system runs on. One test runs the real command (``python -m actors``) in a
subprocess against a database that a system in the test's own trio loop is
running, on the real clock: reads work while it runs, ``retry`` and
``abort`` are applied by that system through the control table, its
``statistics()`` agree afterwards, and nothing says "database is locked".
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
from click.testing import Result
from helpers import ainvoke, invoke
from helpers import rows as sql
from rich.console import Console

import actors
from actors._cli import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, parse_duration
from actors._demo import DemoOptions, LiveDisplay, run_demo
from actors._lock import DatabaseLock
from actors.store.starts import StartTable, database_identity


def as_json(result: Result) -> Any:
    assert result.exit_code in (EXIT_OK, EXIT_FAILED), result.output
    return json.loads(result.output)


async def fill(path: str) -> dict[str, list[int]]:
    """A stopped system's database: dead letters, pending work, a delayed message.

    Session "a": 2 dead letters. Session "b": 3 pending (the first left
    behind by a stopped handler, attempt 1 used). Session "c": 1 delayed.
    """
    holding = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.session_id == "a":
            raise ValueError(f"no way\nValueError: message {msg.id} is bad")
        holding.set()
        await trio.sleep_forever()

    async with actors.run_system(
        path, handler=handler, max_attempts=1, shutdown_timeout=0.01
    ) as system:
        dead = [await system.send("a", i) for i in range(2)]
        await system.drain()
        pending = [await system.send("b", i) for i in range(3)]
        delayed = [await system.send("c", "later", delay=3600)]
        await holding.wait()
    return {"dead": dead, "pending": pending, "delayed": delayed}


def test_the_actors_command_is_installed_and_lists_every_command() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("actors") == "actors._cli:main"
    result = invoke("--help")
    assert result.exit_code == EXIT_OK
    for command in ("demo", "status", "sessions", "dead", "retry", "abort", "purge", "health"):
        assert f"  {command} " in result.output


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("1.5h") == 5400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("2w") == 14 * 86400
    for bad in ("", "7 days", "-1d", "d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


# -- reads --------------------------------------------------------------------------


async def test_status_shows_queues_by_session_and_state(db_path: str) -> None:
    ids = await fill(db_path)
    # As if a process died mid-message: b's head in flight (its handler had
    # started, as the start table says).
    sql(db_path, "UPDATE messages SET state = 1 WHERE id = ?", (ids["pending"][0],))
    starts = StartTable(db_path + ".starts", database_identity(db_path))
    starts.mark(starts.acquire(), ids["pending"][0])
    starts.close()
    st = as_json(invoke("status", db_path, "--json"))
    assert (st["pending"], st["in_flight"], st["dead"]) == (3, 1, 2)
    assert st["handed"] == 0 and st["running"] is False
    assert (st["delayed"], st["retry_waiting"]) == (1, 0)
    assert st["attempts"] == {"1": 1}  # b's head used one attempt
    assert 0 <= st["oldest_pending_age"] < 60
    assert st["session_count"] == 3
    by_session = {s["session_id"]: s for s in st["sessions"]}
    assert [s["session_id"] for s in st["sessions"]] == ["b", "c", "a"]  # deepest first
    assert (by_session["b"]["pending"], by_session["b"]["in_flight"]) == (2, 1)
    assert (by_session["a"]["dead"], by_session["a"]["oldest_age"]) == (2, None)
    assert [m["id"] for m in st["in_flight_messages"]] == [ids["pending"][0]]
    assert st["open_requests"] == 0
    human = invoke("status", db_path)
    assert human.exit_code == EXIT_OK
    for text in ("schema 2", "3 (2 due, 1 delayed, 0 waiting for a retry)", "in flight: 1"):
        assert text in human.output, human.output


async def test_sessions_and_dead_letters(db_path: str) -> None:
    ids = await fill(db_path)
    rows = as_json(invoke("sessions", db_path, "--json"))
    assert [(r["session_id"], r["pending"], r["dead"]) for r in rows] == [
        ("b", 3, 0),
        ("c", 1, 0),
        ("a", 0, 2),
    ]
    assert as_json(invoke("sessions", db_path, "--json", "--session", "c"))[0]["pending"] == 1
    assert len(as_json(invoke("sessions", db_path, "--json", "--limit", "1"))) == 1
    dead = as_json(invoke("dead", db_path, "--json"))
    assert [d["id"] for d in dead] == ids["dead"]
    assert dead[0]["body"] == 0 and dead[0]["attempts"] == 1
    assert "ValueError: no way" in dead[0]["last_error"]
    assert as_json(invoke("dead", db_path, "--json", "--session", "b")) == []
    human = invoke("dead", db_path)
    assert human.exit_code == EXIT_OK
    assert f"message {ids['dead'][0]} is bad" in human.output  # the error's last line


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["sessions"],
        ["dead"],
        ["health"],
        ["retry", "--all"],
        ["abort", "--id", "1"],
        ["purge", "--dead"],
    ],
)
def test_no_database_is_a_clear_usage_error(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "missing.db"
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all " * 100)
    foreign = tmp_path / "foreign.db"
    conn = apsw.Connection(str(foreign))
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
    conn.close()
    for path, says in [
        (missing, "no database file"),
        (junk, "is not an actors database"),
        (foreign, "is not an actors database"),
    ]:
        result = invoke(command[0], str(path), *command[1:])
        assert result.exit_code == EXIT_USAGE, result.output
        assert says in result.output
        assert isinstance(result.exception, SystemExit)  # no traceback
    assert not missing.exists()  # nothing created
    assert sql(str(foreign), "SELECT name FROM sqlite_master") == [("accounts",)]


# -- changes with no system running ---------------------------------------------------


async def test_changes_without_a_running_system_are_applied_directly(db_path: str) -> None:
    ids = await fill(db_path)
    first_dead, second_dead = ids["dead"]
    result = await ainvoke("retry", db_path, "--id", str(first_dead))
    assert result.exit_code == EXIT_OK
    assert result.output == (
        f"requeued dead letter {first_dead} (applied directly: no system is running)\n"
    )
    refused = await ainvoke("retry", db_path, "--id", str(first_dead))
    assert refused.exit_code == EXIT_FAILED
    assert f"message {first_dead} is not a dead letter" in refused.output
    assert as_json(await ainvoke("abort", db_path, "--id", str(ids["pending"][2]), "--json")) == {
        "ok": True,
        "count": 1,
        "detail": f"aborted message {ids['pending'][2]}",
        "applied_by": "command line",
    }
    assert (await ainvoke("abort", db_path, "--id", "9999")).exit_code == EXIT_FAILED
    assert (await ainvoke("purge", db_path, "--dead", "--older-than", "1h")).output.startswith(
        "purged 0 message(s)"
    )
    purged = await ainvoke("purge", db_path, "--session", "b")
    assert purged.output.startswith("purged 2 message(s)")
    assert as_json(await ainvoke("retry", db_path, "--all", "--json"))["count"] == 1
    states = sql(db_path, "SELECT id, session_id, state FROM messages ORDER BY id")
    assert states == [(first_dead, "a", 0), (second_dead, "a", 0), (ids["delayed"][0], "c", 0)]
    assert (await ainvoke("purge", db_path, "--dead")).output.startswith("purged 0 message(s)")
    # The lock was released: a system starts and processes what is left.
    done: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        done.append(msg.id)

    async with actors.run_system(db_path, handler=handler) as system:
        assert system.statistics().pending == 3
        await system.abort(ids["delayed"][0])
        await system.drain()
    assert sorted(done) == [first_dead, second_dead]


async def test_usage_errors_exit_2(db_path: str) -> None:
    # On a real database with a dead letter, so that only the usage check can
    # refuse (a missing database exits 2 as well), and nothing is changed.
    ids = await fill(db_path)
    before = sql(db_path, "SELECT id, state, attempts FROM messages ORDER BY id")
    for args, says in (
        (["retry", db_path], "give exactly one of --id N and --all"),
        (["retry", db_path, "--id", "1", "--all"], "give exactly one of --id N and --all"),
        (["abort", db_path], "Missing option '--id'"),
        (["purge", db_path], "give --session S, or --dead"),
        (["purge", db_path, "--session", "s", "--older-than", "7d"], "add --dead"),
        (["purge", db_path, "--dead", "--older-than", "soon"], "is not a duration"),
        (["status", db_path, "--limit", "0"], "--limit"),
        (["retry", db_path, "--all", "--wait", "0"], "--wait"),
        (["abort", db_path, "--id", "one"], "--id"),
    ):
        result = await ainvoke(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert "Error:" in result.output and says in result.output, (args, result.output)
    assert sql(db_path, "SELECT id, state, attempts FROM messages ORDER BY id") == before
    assert sql(db_path, "SELECT count(*) FROM control") == [(0,)]
    assert len(ids["dead"]) == 2


async def test_a_running_system_that_does_not_answer_exits_4(db_path: str) -> None:
    ids = await fill(db_path)
    lock = DatabaseLock(db_path)  # stands for a running system that never looks
    lock.acquire()
    try:
        result = await ainvoke("retry", db_path, "--all", "--wait", "0.05", "--json")
        assert result.exit_code == EXIT_TIMEOUT, result.output
        outcome = json.loads(result.output)
        assert outcome["ok"] is False and outcome["withdrawn"] is True
        assert "withdrawn: nothing was changed" in outcome["error"]
        human = await ainvoke("abort", db_path, "--id", str(ids["dead"][0]), "--wait", "0.05")
        assert human.exit_code == EXIT_TIMEOUT
        assert "no answer to control request" in human.output
    finally:
        lock.release()
    # Both requests were taken back: nothing is left for a system to apply.
    assert sql(db_path, "SELECT count(*) FROM control") == [(0,)]
    assert [r[0] for r in sql(db_path, "SELECT id FROM messages WHERE state = 2")] == ids["dead"]


# -- the demo ---------------------------------------------------------------------------


def test_the_demo_command_runs_and_verifies(tmp_path: Path) -> None:
    result = invoke(
        "demo",
        "--sessions",
        "3",
        "--messages",
        "4",
        "--duration",
        "0.2",
        "--seed",
        "1",
        "--db",
        str(tmp_path / "d.db"),
    )
    assert result.exit_code == EXIT_OK, result.output
    assert "OK: every acknowledged message was processed or dead-lettered" in result.output
    assert "  sent                      12  " in result.output
    assert "  lost                       0  " in result.output


async def test_the_live_display_shows_progress(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    options = DemoOptions(
        db=str(tmp_path / "d.db"),
        sessions=2,
        messages=3,
        seed=2,
        duration=0.1,
        progress_interval=0.01,
    )
    with LiveDisplay(console, 6) as display:
        report = await run_demo(options, out=lambda _: None, show=display.update)
    assert report.ok and report.sent == 6
    text = out.getvalue()
    assert "sent" in text and "finished" in text
    assert "6/6" in text
    assert "failed attempts" in text


# -- a real running system ---------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_command_against_a_running_system(db_path: str) -> None:
    fixed = False
    hold = trio.Event()
    holding = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.session_id == "bad" and not fixed:
            raise ValueError("not fixed yet")
        if msg.body == "hold":
            holding.set()
            await hold.wait()

    outputs: list[subprocess.CompletedProcess[str]] = []

    async def cli_(*args: str) -> subprocess.CompletedProcess[str]:
        result = await trio.to_thread.run_sync(lambda: run_cli(*args))
        outputs.append(result)
        return result

    async with actors.run_system(
        db_path,
        handler=handler,
        max_attempts=1,
        handler_timeout=None,
        status_interval=0.05,
        control_interval=0.02,
    ) as system:
        dead = [await system.send("bad", i) for i in range(3)]
        await system.drain()
        held = await system.send("h", "hold")
        behind = [await system.send("h", i) for i in range(2)]
        await holding.wait()

        async def keep_writing(task_status: trio.TaskStatus[None]) -> None:
            # The system keeps writing while the command line reads.
            task_status.started()
            n = 0
            while True:
                await system.send(f"busy-{n % 7}", n)
                n += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            await nursery.start(keep_writing)
            st = json.loads((await cli_("status", db_path, "--json")).stdout)
            assert st["dead"] == 3
            assert held in [m["id"] for m in st["in_flight_messages"]]
            assert st["heartbeat"] is not None and st["heartbeat"]["pid"] > 0
            assert [
                d["id"] for d in json.loads((await cli_("dead", db_path, "--json")).stdout)
            ] == (dead)
            health = await cli_("health", db_path)
            assert health.returncode == EXIT_OK, health.stdout + health.stderr
            assert health.stdout.startswith("healthy: ")

            # Changes go through the control table and the system's own methods.
            fixed = True
            retried = await cli_("retry", db_path, "--all", "--json")
            assert retried.returncode == EXIT_OK, retried.stderr
            assert json.loads(retried.stdout) == {
                "ok": True,
                "count": 3,
                "detail": "requeued 3 dead letter(s)",
                "applied_by": "running system",
            }
            refused = await cli_("abort", db_path, "--id", str(held))
            assert refused.returncode == EXIT_FAILED
            assert "in flight and cannot be aborted" in refused.stderr
            aborted = await cli_("abort", db_path, "--id", str(behind[0]))
            assert aborted.returncode == EXIT_OK
            assert aborted.stdout == (
                f"aborted message {behind[0]} (applied by the running system)\n"
            )
            nursery.cancel_scope.cancel()
        hold.set()
        await system.drain()
        stats = system.statistics()
        assert stats.dead == 0
        assert stats.pending == stats.in_flight == 0
        assert stats.processed == stats.sends - 1  # all but the aborted one
        assert sql(db_path, "SELECT count(*) FROM messages") == [(0,)]
        assert system._control.statistics().applied == 3
    for result in outputs:
        assert "locked" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
