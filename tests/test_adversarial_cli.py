"""The `actors` command as an operator meets it: odd moments, odd input.

- A change asked while the system is stopping is applied directly once the
  system is gone, instead of waiting out ``--wait`` (exit 4).
- "in flight" means a handler started, as ``statistics().in_flight`` does;
  messages handed to an actor but not started are shown apart.
- After a stop, ``status`` says stopped, as ``health`` does.
- Every option refuses what it cannot use (undecodable text, numbers out of
  range, nan) as a usage error, exit 2, never a traceback; with ``--json``
  errors are JSON on stdout, with the same exit codes.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import attrs
import pytest
import trio
import trio.testing
from click.testing import Result
from helpers import ainvoke, invoke
from helpers import rows as sql

import actors
import actors._cli
from actors._cli import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
)
from actors._demo import DemoOptions, run_demo
from actors._lock import DatabaseLock
from actors.store.starts import StartTable, database_identity


async def nothing(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def dead_letters(path: str, n: int) -> list[int]:
    """A stopped system's database with ``n`` dead letters in session "bad"."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        raise ValueError("bad")

    async with actors.run_system(path, handler=handler, max_attempts=1) as system:
        ids = [await system.send("bad", i) for i in range(n)]
        await system.drain()
    return ids


def watch_requests(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """An event set once the command line has written its request and polls.

    (The command runs in a worker thread of the test's trio run.)
    """
    asked = trio.Event()
    real = actors._cli.request
    token = trio.lowlevel.current_trio_token()

    def spy(*args: Any, stopped: Callable[[], bool], **kwargs: Any) -> dict[str, Any]:
        def watched() -> bool:
            if not asked.is_set():
                trio.from_thread.run_sync(asked.set, trio_token=token)
            return stopped()

        return real(*args, stopped=watched, **kwargs)

    monkeypatch.setattr(actors._cli, "request", spy)
    return asked


# -- a change asked while the system stops ------------------------------------------


async def test_a_change_asked_of_a_stopping_system_is_applied_directly(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = await dead_letters(db_path, 2)
    asked = watch_requests(monkeypatch)
    done: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        done.append(msg.id)

    result: list[Result] = []

    async def command() -> None:
        result.append(await ainvoke("retry", db_path, "--all", "--json", "--wait", "60"))

    # Far below --wait: the command must not wait it out. The system never
    # looks at the control table while it runs, and stops without answering
    # (the nursery then waits for the command to notice).
    with trio.fail_after(20):
        async with (
            trio.open_nursery() as nursery,
            actors.run_system(db_path, handler=handler, control_interval=3600) as system,
        ):
            nursery.start_soon(command)
            await asked.wait()
            assert system.statistics().dead == 2
    outcome = json.loads(result[0].output)
    assert result[0].exit_code == EXIT_OK, result[0].output
    assert outcome == {
        "ok": True,
        "count": 2,
        "detail": "requeued 2 dead letter(s)",
        "applied_by": "command line",
    }
    assert done == []  # requeued after the system had stopped: nothing ran them
    assert sql(db_path, "SELECT id, state FROM messages ORDER BY id") == [(i, 0) for i in dead]
    assert sql(db_path, "SELECT count(*) FROM control") == [(0,)]  # withdrawn, then applied
    lock = DatabaseLock(db_path)
    lock.acquire()  # released by the command
    lock.release()


async def test_a_request_taken_by_a_system_that_stopped_is_finished_once(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = await dead_letters(db_path, 1)
    asked = watch_requests(monkeypatch)
    lock = DatabaseLock(db_path)  # stands for a system that takes the request, then stops
    lock.acquire()
    result: list[Result] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:

            async def command() -> None:
                result.append(await ainvoke("abort", db_path, "--id", str(dead[0]), "--wait", "60"))

            nursery.start_soon(command)
            await asked.wait()
            # Taken as Control.serve takes it (Store.take_control), never answered.
            sql(db_path, 'UPDATE control SET result = \'{"status": "applying"}\'')
            lock.release()
    assert result[0].exit_code == EXIT_OK, result[0].output
    assert result[0].output == (
        f"aborted message {dead[0]} (applied directly: the system stopped before it answered)\n"
    )
    # The request carries its outcome: the next system does not apply it again.
    ((done_at, outcome),) = sql(db_path, "SELECT done_at, result FROM control")
    assert done_at is not None and json.loads(outcome)["ok"] is True
    async with actors.run_system(db_path, handler=nothing) as system:
        assert system.statistics().dead == system.statistics().pending == 0
    assert sql(db_path, "SELECT count(*) FROM messages") == [(0,)]


async def test_a_system_that_runs_on_and_does_not_answer_still_exits_4(db_path: str) -> None:
    await dead_letters(db_path, 1)
    lock = DatabaseLock(db_path)
    lock.acquire()
    try:
        result = await ainvoke("retry", db_path, "--all", "--wait", "0.05", "--json")
    finally:
        lock.release()
    assert result.exit_code == EXIT_TIMEOUT
    outcome = json.loads(result.output)
    assert outcome["ok"] is False and outcome["withdrawn"] is True
    assert outcome["exit_code"] == EXIT_TIMEOUT


# -- in flight means a handler started ------------------------------------------------


async def test_in_flight_counts_started_handlers_and_handed_messages_apart(
    db_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    holding = trio.Event()
    release = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "hang":
            holding.set()
            await release.wait()

    async with actors.run_system(
        db_path, handler=handler, handler_timeout=None, status_interval=0.05
    ) as system:
        hung = await system.send("chat", "hang")
        await holding.wait()
        queued = await system.send("chat", "next")  # handed to the busy actor
        other = await system.send("idle-later", "x", delay=3600)
        # Both of chat's messages are claimed in the database: the second one
        # waits in the actor's memory (claim on delivery), not started.
        claimed = sql(db_path, "SELECT id FROM messages WHERE state = 1 ORDER BY id")
        assert claimed == [(hung,), (queued,)]
        stats = system.statistics()
        assert (stats.in_flight, stats.pending) == (1, 2)

        st = json.loads((await ainvoke("status", db_path, "--json")).output)
        assert (st["in_flight"], st["handed"], st["pending"]) == (1, 1, 1)
        assert [m["id"] for m in st["in_flight_messages"]] == [hung]
        # Only the started message has used an attempt (the claim of the
        # handed one counted one its handler has not used).
        assert st["attempts"] == {"1": 1}
        chat = next(s for s in st["sessions"] if s["session_id"] == "chat")
        assert (chat["in_flight"], chat["handed"], chat["pending"]) == (1, 1, 0)
        rows = json.loads(
            (await ainvoke("sessions", db_path, "--json", "--session", "chat")).output
        )
        assert (rows[0]["in_flight"], rows[0]["handed"]) == (1, 1)
        human = (await ainvoke("status", db_path)).output
        assert "in flight  1 (a handler started)" in human, human
        assert "handed     1 (claimed by an actor" in human, human
        # health counts as statistics() does: the handed message is pending.
        await trio.sleep(0.2)  # (virtual) a heartbeat or more
        assert system._health.statistics().heartbeats > 0
        health = json.loads((await ainvoke("health", db_path, "--json")).output)
        assert (health["health"]["in_flight"], health["health"]["pending"]) == (1, 2)
        release.set()
        await system.abort(other)
        await system.drain()
        st = json.loads((await ainvoke("status", db_path, "--json")).output)
        assert (st["in_flight"], st["handed"], st["pending"]) == (0, 0, 0)


async def test_a_dead_process_leaves_in_flight_what_recovery_will_charge(db_path: str) -> None:
    # The marks of the start table survive the process: a message at or before
    # a session's mark had started (recovery charges its attempt), one after it
    # had not (its attempt is given back). status says the same.
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep_forever()

    async with actors.run_system(db_path, handler=handler, shutdown_timeout=0.01) as system:
        ids = [await system.send("s", i) for i in range(3)]
    table = StartTable(db_path + ".starts", database_identity(db_path))
    table.mark(table.acquire(), ids[0])  # as if the handler of ids[0] had started
    sql(db_path, "UPDATE messages SET state = 1 WHERE id IN (?, ?)", (ids[0], ids[1]))
    st = json.loads((await ainvoke("status", db_path, "--json")).output)
    assert st["running"] is False
    assert (st["in_flight"], st["handed"], st["pending"]) == (1, 1, 1)
    assert "left by a process that died" in (await ainvoke("status", db_path)).output
    table.close()


# -- stopped means stopped ---------------------------------------------------------------


def test_status_after_a_clean_stop_says_stopped_as_health_does(db_path: str) -> None:
    async def run() -> None:
        async with actors.run_system(db_path, handler=nothing, status_interval=0.5) as system:
            await system.send("a", 1)
            await system.drain()
            await trio.sleep(1.2)  # (virtual) heartbeats written
            assert system._health.statistics().heartbeats >= 2

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    st = json.loads(invoke("status", db_path, "--json").output)
    assert st["running"] is False
    assert st["heartbeat"] is not None  # who ran last is still told
    human = invoke("status", db_path)
    assert human.exit_code == EXIT_OK
    assert "stopped: no system is running (the last one, pid" in human.output, human.output
    assert "processed, last progress" not in human.output
    health = invoke("health", db_path)
    assert health.exit_code == EXIT_NOT_RUNNING
    assert health.output.startswith("not running")


async def test_status_while_running_says_running(db_path: str) -> None:
    async with actors.run_system(db_path, handler=nothing):
        st = json.loads((await ainvoke("status", db_path, "--json")).output)
        assert st["running"] is True
        human = (await ainvoke("status", db_path)).output
        assert "running, no heartbeat yet" in human, human


def test_a_lock_left_by_a_killed_process_is_not_running(db_path: str, tmp_path: Path) -> None:
    # kill -9 leaves the owner's text in the lock file, but not the lock.
    trio.run(dead_letters, db_path, 1)
    Path(db_path + ".lock").write_text("pid 999999 on elsewhere, started 2026-01-01")
    assert json.loads(invoke("status", db_path, "--json").output)["running"] is False
    assert invoke("health", db_path).exit_code == EXIT_NOT_RUNNING


# -- every option refuses what it cannot use -----------------------------------------------

HUGE = str(10**30)
LONE = "\udcff"  # what the shell's $'\xff' becomes


def usage_cases(db: str) -> list[tuple[list[str], str]]:
    return [
        (["sessions", db, "--session", LONE], "--session"),
        (["sessions", db, "--session", ""], "--session"),
        (["sessions", db, "--session", "x" * 300], "--session"),
        (["dead", db, "--session", LONE], "--session"),
        (["purge", db, "--session", LONE], "--session"),
        (["status", db, "--limit", HUGE], "--limit"),
        (["sessions", db, "--limit", HUGE], "--limit"),
        (["dead", db, "--limit", HUGE], "--limit"),
        (["dead", db, "--limit", "-1"], "--limit"),
        (["retry", db, "--id", "0"], "--id"),
        (["retry", db, "--id", "-3"], "--id"),
        (["retry", db, "--id", str(2**63)], "--id"),
        (["abort", db, "--id", "0"], "--id"),
        (["abort", db, "--id", "-1"], "--id"),
        (["abort", db, "--id", str(2**63)], "--id"),
        (["abort", db, "--id", HUGE], "--id"),
        (["retry", db, "--all", "--wait", "nan"], "--wait"),
        (["retry", db, "--all", "--wait", "inf"], "--wait"),
        (["abort", db, "--id", "1", "--wait", "-1"], "--wait"),
        (["purge", db, "--dead", "--wait", "nan"], "--wait"),
        (["purge", db, "--dead", "--older-than", "9" * 400 + "d"], "--older-than"),
        (["purge", db, "--dead", "--older-than", "-1d"], "--older-than"),
        (["health", db, "--stall-after", "nan"], "--stall-after"),
        (["health", db, "--stall-after", "inf"], "--stall-after"),
        (["health", db, "--stale-after", "nan"], "--stale-after"),
        (["health", db, "--stale-after", "0"], "--stale-after"),
        (["status", db + LONE], "not valid UTF-8"),
        (["retry", db + LONE, "--all"], "not valid UTF-8"),
        (["demo", "--db", db + LONE], "not valid UTF-8"),
        (["demo", "--sessions", HUGE], "--sessions"),
        (["demo", "--messages", HUGE], "--messages"),
        (["demo", "--fail-rate", "nan"], "--fail-rate"),
        (["demo", "--poison-rate", "nan"], "--poison-rate"),
        (["demo", "--kill-interval", "nan"], "--kill-interval"),
        (["demo", "--kill-interval", "inf"], "--kill-interval"),
        (["demo", "--duration", "nan"], "--duration"),
        (["demo", "--duration", "-1"], "--duration"),
        (["demo", "--duration", "1e300"], "--duration"),
    ]


def test_every_option_refuses_what_it_cannot_use_with_exit_2(db_path: str) -> None:
    ids = trio.run(dead_letters, db_path, 1)
    before = sql(db_path, "SELECT id, state, attempts FROM messages")
    for args, says in usage_cases(db_path):
        result = invoke(*args)
        assert result.exit_code == EXIT_USAGE, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert says in result.output, (args, result.output)
        if args[0] != "demo":
            as_json = invoke(*args, "--json")
            assert as_json.exit_code == EXIT_USAGE, (args, as_json.output)
            error = json.loads(as_json.output)
            assert error["ok"] is False and error["exit_code"] == EXIT_USAGE
            assert says in error["error"]
    assert sql(db_path, "SELECT id, state, attempts FROM messages") == before
    assert [i for (i, *_) in before] == ids
    assert sql(db_path, "SELECT count(*) FROM control") == [(0,)]
    assert not [name for name in os.listdir(os.path.dirname(db_path)) if LONE in name]


def test_json_errors_keep_their_exit_codes(tmp_path: Path, db_path: str) -> None:
    missing = invoke("status", str(tmp_path / "missing.db"), "--json")
    assert missing.exit_code == EXIT_USAGE
    assert json.loads(missing.output) == {
        "ok": False,
        "error": f"no database file at {str(tmp_path / 'missing.db')!r}",
        "exit_code": EXIT_USAGE,
    }
    trio.run(dead_letters, db_path, 1)
    refused = invoke("abort", db_path, "--id", "9999", "--json")
    assert refused.exit_code == EXIT_FAILED
    assert json.loads(refused.output) == {
        "ok": False,
        "error": "no pending or dead message 9999",
        "applied_by": "command line",
        "exit_code": EXIT_FAILED,
    }
    usage = invoke("retry", db_path, "--json")  # neither --id nor --all
    assert usage.exit_code == EXIT_USAGE
    assert "give exactly one of --id N and --all" in json.loads(usage.output)["error"]
    health = invoke("health", db_path, "--json")
    assert health.exit_code == EXIT_NOT_RUNNING
    assert json.loads(health.output)["exit_code"] == EXIT_NOT_RUNNING


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == EXIT_OK
    assert result.output == f"actors {actors.__version__}\n"


def test_sessions_json_calls_the_most_attempts_used_most_attempts(db_path: str) -> None:
    trio.run(dead_letters, db_path, 2)
    (row,) = json.loads(invoke("sessions", db_path, "--json").output)
    assert row["most_attempts"] == 1
    assert "max_attempts" not in row


# -- the demo: a killed run is checked by the next one ---------------------------------------

TABLE_ROW = re.compile(r"^  ([a-z ]+?)\s{2,}(\d+)  ", re.MULTILINE)
PROGRESS = re.compile(r"this run: sent\s+(\d+)/(\d+)\s+processed\s+(\d+)")


def demo_command(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "actors", "demo", "--db", str(db), *args]


def test_a_demo_killed_with_kill_9_is_checked_by_the_next_run(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = subprocess.Popen(
        demo_command(db, "--sessions", "50", "--messages", "40", "--duration", "8", "--seed", "3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert first.stdout is not None
    progress: list[tuple[int, int, int]] = []
    try:
        # Progress lines come through a pipe (block-buffered unless flushed):
        # wait for two that show acknowledged and processed messages.
        while len(progress) < 2 or progress[-1][2] == 0:
            ready, _, _ = select.select([first.stdout], [], [], 30)
            assert ready, "no progress line within 30 s"
            line = first.stdout.readline()
            assert line, "the demo ended before it was killed"
            found = PROGRESS.search(line)
            if found:
                progress.append((int(found[1]), int(found[2]), int(found[3])))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stdout.close()
    sent_before_kill, total, _ = progress[-1]
    assert sent_before_kill < total  # still sending: a run lasts long enough to be killed

    second = subprocess.run(
        demo_command(db, "--sessions", "4", "--messages", "5", "--duration", "0.2", "--seed", "4"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == EXIT_OK, second.stdout + second.stderr
    table = {name: int(value) for name, value in TABLE_ROW.findall(second.stdout)}
    # Every id the killed run acknowledged is accounted for, each one way.
    assert table["earlier sent"] >= sent_before_kill > 0
    assert (
        table["earlier processed"] + table["earlier dead"] + table["earlier pending"]
        == table["earlier sent"]
    )
    assert table["earlier pending"] == 0  # this run finished them
    assert table["lost"] == 0
    # This run's own counts are its own.
    assert table["sent"] == 20
    assert table["processed"] + table["dead"] == 20
    assert "earlier runs on this file acknowledged" in second.stdout
    assert "earlier runs' too" in second.stdout
    for found in PROGRESS.finditer(second.stdout):
        sent, total, processed = (int(g) for g in found.groups())
        assert total == 20 and processed <= sent <= 20, found[0]
    # retried and failed attempts are distinct facts now (a run has both).
    assert "restarts" not in table


async def test_the_demo_counts_an_earlier_run_s_message_that_vanished_as_lost(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "demo.db")
    quick = DemoOptions(db=db, sessions=2, messages=3, seed=1, duration=0, kill_interval=1e6)
    first = await run_demo(quick, out=lambda _: None)
    assert first.ok and first.sent == 6 and first.earlier_sent == 0
    # As if a message the first run acknowledged had vanished from the database.
    ledger = apsw.Connection(db + ".demo-ledger")
    ledger.execute("INSERT INTO sent VALUES (?, 1)", (10**9,))
    ledger.close()
    second = await run_demo(attrs.evolve(quick, seed=2), out=lambda _: None)
    assert (second.earlier_sent, second.earlier_processed) == (7, 6 - first.dead)
    assert second.lost == 1
    assert not second.ok
    assert re.search(r"^  lost\s+1  ", second.table(), re.MULTILINE)


def test_the_demo_runs_about_ten_seconds_unless_told(tmp_path: Path) -> None:
    assert DemoOptions().duration == 10.0
    result = invoke("demo", "--help")
    assert "--duration SECONDS" in result.output and "[default: 10.0;" in result.output


def test_the_demo_refuses_a_database_it_cannot_use(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a database " * 100)
    result = invoke("demo", "--db", str(junk), "--sessions", "1", "--messages", "1")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "is not an SQLite database" in result.output
    assert isinstance(result.exception, SystemExit)
