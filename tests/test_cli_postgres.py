"""The `actors` command on PostgreSQL: the same commands, a URL for the database.

The database is filled by running a system on it, as an application would;
the command runs in-process (CliRunner, in a worker thread when a system
runs in the test's trio loop), as in test_cli.py. On PostgreSQL a system is
a cluster: whether one runs is what the members' leases say, and
``status`` and ``health`` show the members. Lease times follow the
database's clock, in real time: the tests that need a member to be alive
or gone write its row.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import trio
import trio.testing
from click.testing import Result
from helpers import ainvoke, invoke

import actors
from actors._cli import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from actors._control import request
from actors.store.postgres import PgStore
from actors.store.postgres_schema import SCHEMA_VERSION
from actors.store.postgres_url import hide_password, is_url, redact

SECRET = "sekrit-Pa55"


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def as_json(result: Result) -> Any:
    assert result.exit_code in (EXIT_OK, EXIT_FAILED), result.output
    return json.loads(result.output)


def with_password(url: str, database: str | None = None) -> str:
    """``url`` with SECRET as its password (the test server trusts every local
    login: a password is accepted, never checked), on ``database`` if given."""
    parts = urlsplit(url)
    netloc = f"{parts.username}:{SECRET}@{parts.hostname}:{parts.port}"
    path = parts.path if database is None else f"/{database}"
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


async def fill(url: str) -> dict[str, list[int]]:
    """A stopped cluster's database: processed, dead, pending and delayed messages.

    Session "ok": 2 processed. Session "a": 2 dead letters. Session "b": 3
    pending (the first left behind by a stopped handler, attempt 1 used).
    Session "c": 1 delayed.
    """
    holding = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.session_id == "a":
            raise ValueError(f"no way\nValueError: message {msg.id} is bad")
        if msg.session_id == "b":
            holding.set()
            await trio.sleep_forever()

    async with actors.run_system(
        url, handler=handler, max_attempts=1, shutdown_timeout=0.01
    ) as system:
        done = [await system.send("ok", i) for i in range(2)]
        dead = [await system.send("a", i) for i in range(2)]
        await system.drain()
        pending = [await system.send("b", i) for i in range(3)]
        delayed = [await system.send("c", "later", delay=3600)]
        await holding.wait()
    return {"done": done, "dead": dead, "pending": pending, "delayed": delayed}


# -- reads ------------------------------------------------------------------------------


async def test_status_counts_messages_and_shows_the_members(pg_url: str) -> None:
    await fill(pg_url)
    st = as_json(invoke("status", pg_url, "--json"))
    assert (st["pending"], st["delayed"], st["retry_waiting"]) == (4, 1, 0)
    assert (st["handed"], st["in_flight"], st["dead"]) == (0, 0, 2)
    assert st["running"] is False and st["schema_version"] == SCHEMA_VERSION
    assert st["attempts"] == {"1": 1}  # b's head used one attempt
    assert [s["session_id"] for s in st["sessions"]] == ["b", "c", "a"]  # deepest first
    assert st["session_count"] == 3 and st["open_requests"] == 0
    # The heartbeat the stop wrote (it says so), with what that member did.
    assert st["heartbeat"]["stopping"] is True and st["heartbeat"]["processed"] == 2
    cluster = st["cluster"]
    assert (cluster["buckets"], cluster["held"], cluster["live"], cluster["member_count"]) == (
        1024,
        0,
        0,
        1,
    )
    (member,) = cluster["members"]
    assert (member["pid"], member["host"]) == (os.getpid(), socket.gethostname())
    assert (member["alive"], member["state"], member["buckets"], member["up"]) == (
        False,
        "gone",
        0,
        None,
    )
    assert member["processed"] == 2
    human = invoke("status", pg_url)
    assert human.exit_code == EXIT_OK
    for text in (
        f"{pg_url} (schema {SCHEMA_VERSION})",
        f"stopped: no system is running (the last one, pid {os.getpid()}",
        "4 (3 due, 1 delayed, 0 waiting for a retry)",
        "members: 0 alive of 1",
        member["id"][:8],
        "sessions: the 3 deepest of 3",
    ):
        assert text in human.output, human.output


async def test_sessions_and_dead_letters(pg_url: str) -> None:
    ids = await fill(pg_url)
    rows = as_json(invoke("sessions", pg_url, "--json"))
    assert [(r["session_id"], r["pending"], r["dead"]) for r in rows] == [
        ("b", 3, 0),
        ("c", 1, 0),
        ("a", 0, 2),
    ]
    assert as_json(invoke("sessions", pg_url, "--json", "--session", "c"))[0]["pending"] == 1
    dead = as_json(invoke("dead", pg_url, "--json"))
    assert [d["id"] for d in dead] == ids["dead"]
    assert dead[0]["body"] == 0 and dead[0]["attempts"] == 1
    assert "ValueError: no way" in dead[0]["last_error"]
    assert as_json(invoke("dead", pg_url, "--json", "--session", "b")) == []
    assert len(as_json(invoke("dead", pg_url, "--json", "--limit", "1"))) == 1
    human = invoke("dead", pg_url)
    assert human.exit_code == EXIT_OK
    assert f"message {ids['dead'][0]} is bad" in human.output  # the error's last line


async def test_health_with_no_member_alive_says_not_running(pg_url: str) -> None:
    await fill(pg_url)
    result = invoke("health", pg_url)
    assert result.exit_code == EXIT_NOT_RUNNING
    assert result.output.startswith(f"not running: no system is running on {pg_url}")
    report = json.loads(invoke("health", pg_url, "--json").output)
    assert report["exit_code"] == EXIT_NOT_RUNNING and report["running"] is False
    assert report["cluster"]["live"] == 0


# -- changes with no member alive ---------------------------------------------------------


async def test_changes_with_no_member_alive_are_applied_directly(pg_url: str) -> None:
    ids = await fill(pg_url)
    first_dead, second_dead = ids["dead"]
    result = await ainvoke("retry", pg_url, "--id", str(first_dead))
    assert result.exit_code == EXIT_OK, result.output
    assert result.output == (
        f"requeued dead letter {first_dead} (applied directly: no system is running)\n"
    )
    refused = await ainvoke("retry", pg_url, "--id", str(first_dead))
    assert refused.exit_code == EXIT_FAILED
    assert f"message {first_dead} is not a dead letter" in refused.output
    assert as_json(await ainvoke("abort", pg_url, "--id", str(ids["pending"][2]), "--json")) == {
        "ok": True,
        "count": 1,
        "detail": f"aborted message {ids['pending'][2]}",
        "applied_by": "command line",
    }
    assert (await ainvoke("abort", pg_url, "--id", "9999")).exit_code == EXIT_FAILED
    assert (await ainvoke("purge", pg_url, "--dead", "--older-than", "1h")).output.startswith(
        "purged 0 message(s)"
    )
    purged = await ainvoke("purge", pg_url, "--session", "b")
    assert purged.output.startswith("purged 2 message(s)")
    assert as_json(await ainvoke("retry", pg_url, "--all", "--json"))["count"] == 1
    states = sql(pg_url, "SELECT id, session_id, state FROM actors_messages ORDER BY id")
    assert states == [(first_dead, "a", 0), (second_dead, "a", 0), (ids["delayed"][0], "c", 0)]
    assert sql(pg_url, "SELECT count(*) FROM actors_control") == [(0,)]  # no request was left
    # A system that starts finds the changes made, and processes what is left.
    done: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        done.append(msg.id)

    async with actors.run_system(pg_url, handler=handler) as system:
        assert system.statistics().pending == 3
        await system.abort(ids["delayed"][0])
        await system.drain()
    assert sorted(done) == [first_dead, second_dead]


async def test_a_member_that_does_not_answer_and_one_whose_lease_runs_out(pg_url: str) -> None:
    ids = await fill(pg_url)
    # A member alive by its lease that never looks at the control table
    # (its row says it is alive; no process runs it).
    sql(
        pg_url,
        "INSERT INTO actors_members (id, host, pid, seen_until)"
        " VALUES ('silent', 'elsewhere', 1, now() + interval '1 hour')",
    )
    st = as_json(invoke("status", pg_url, "--json"))
    assert st["running"] is True and st["cluster"]["live"] == 1
    assert st["cluster"]["members"][0]["state"] == "starting"  # no heartbeat yet
    assert (
        "running: 1 member(s) alive, 1 starting, holding 0 of 1024"
        in invoke("status", pg_url).output
    )
    health = invoke("health", pg_url)
    assert health.exit_code == EXIT_FAILED
    assert "no running member has written a heartbeat yet" in health.output
    result = await ainvoke("retry", pg_url, "--all", "--wait", "0.05", "--json")
    assert result.exit_code == EXIT_TIMEOUT, result.output
    outcome = json.loads(result.output)
    assert outcome["ok"] is False and outcome["withdrawn"] is True
    assert sql(pg_url, "SELECT count(*) FROM actors_control") == [(0,)]
    assert [r[0] for r in sql(pg_url, "SELECT id FROM actors_messages WHERE state = 2")] == (
        ids["dead"]
    )
    # Its lease runs out while the command waits (by the database's clock,
    # which the command reads as it polls): the command applies the change.
    sql(pg_url, "UPDATE actors_members SET seen_until = now() + interval '0.3 s'")
    result = await ainvoke("retry", pg_url, "--all")
    assert result.exit_code == EXIT_OK, result.output
    assert result.output == (
        "requeued 2 dead letter(s) (applied directly: the system stopped before it answered)\n"
    )
    assert sql(pg_url, "SELECT count(*) FROM actors_control") == [(0,)]  # withdrawn


# -- a running member ---------------------------------------------------------------------


def heartbeat_written(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """An event set once a running system's heartbeat has committed."""
    written = trio.Event()
    real = PgStore.heartbeat

    def spy(store: PgStore, value: str) -> Coroutine[Any, Any, None]:
        async def beat() -> None:
            await real(store, value)
            written.set()

        return beat()

    monkeypatch.setattr(PgStore, "heartbeat", spy)
    return written


async def test_a_running_member_answers_the_command_line(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fixed = False
    hold = trio.Event()
    holding = trio.Event()
    beat = heartbeat_written(monkeypatch)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.session_id == "bad" and not fixed:
            raise ValueError("not fixed yet")
        if msg.body == "hold":
            holding.set()
            await hold.wait()

    async with actors.run_system(
        pg_url,
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
        await beat.wait()

        st = as_json(await ainvoke("status", pg_url, "--json"))
        assert st["running"] is True and st["dead"] == 3
        assert held in [m["id"] for m in st["in_flight_messages"]]
        (member,) = st["cluster"]["members"]
        assert (member["pid"], member["alive"], member["state"]) == (os.getpid(), True, "running")
        assert member["buckets"] == st["cluster"]["held"] == 1024  # alone: every bucket
        human = (await ainvoke("status", pg_url)).output
        assert "running: 1 member(s) alive, holding 1024 of 1024 buckets" in human, human
        health = await ainvoke("health", pg_url)
        assert health.exit_code == EXIT_OK, health.output
        assert health.output.startswith("healthy: ")
        assert f"1 member(s) alive: pid {os.getpid()} on" in health.output
        assert [d["id"] for d in as_json(await ainvoke("dead", pg_url, "--json"))] == dead

        # Changes go through the control table and the member's own methods.
        fixed = True
        retried = await ainvoke("retry", pg_url, "--all", "--json")
        assert as_json(retried) == {
            "ok": True,
            "count": 3,
            "detail": "requeued 3 dead letter(s)",
            "applied_by": "running system",
        }
        refused = await ainvoke("abort", pg_url, "--id", str(held))
        assert refused.exit_code == EXIT_FAILED
        assert "in flight and cannot be aborted" in refused.output
        aborted = await ainvoke("abort", pg_url, "--id", str(behind[0]))
        assert aborted.exit_code == EXIT_OK, aborted.output
        assert aborted.output == f"aborted message {behind[0]} (applied by the running system)\n"
        hold.set()
        await system.drain()
        stats = system.statistics()
        assert stats.dead == 0 and stats.pending == stats.in_flight == 0
        assert stats.processed == stats.sends - 1  # all but the aborted one
        assert system._control.statistics().applied == 3
    assert sql(pg_url, "SELECT count(*) FROM actors_messages") == [(0,)]


# -- what is not a usable database ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


COMMANDS = [
    ["status"],
    ["sessions"],
    ["dead"],
    ["health"],
    ["retry", "--all"],
    ["abort", "--id", "1"],
    ["purge", "--dead"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_an_unusable_url_is_a_clear_usage_error_that_hides_the_password(
    pg_url: str, command: list[str]
) -> None:
    cases: list[tuple[str, str]] = [
        (f"postgresql://me:{SECRET}@127.0.0.1:{_free_port()}/x", "cannot connect to PostgreSQL"),
        (with_password(pg_url, "no_such_database"), 'database "no_such_database" does not exist'),
        (with_password(pg_url), "is not an actors database"),  # (an empty database)
        # libpq quotes a malformed URL whole in its error, password and all.
        (f"postgresql://me:{SECRET}@[::1/x", "cannot connect to PostgreSQL"),
        (f"postgres://me@127.0.0.1:1/x?password={SECRET}", "cannot connect to PostgreSQL"),
    ]
    for url, says in cases:
        result = invoke(command[0], url, *command[1:])
        assert result.exit_code == EXIT_USAGE, (url, result.output)
        assert says in result.output, (url, result.output)
        assert SECRET not in result.output and "***" in result.output, result.output
        assert isinstance(result.exception, SystemExit)  # no traceback
        report = json.loads(invoke(command[0], url, *command[1:], "--json").output)
        assert report["ok"] is False and report["exit_code"] == EXIT_USAGE
        assert SECRET not in report["error"] and says in report["error"]
    assert sql(pg_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def test_tables_of_another_application_are_not_an_actors_database(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE actors_meta (key text PRIMARY KEY, value text NOT NULL)")
    sql(pg_url, "INSERT INTO actors_meta VALUES ('application', 'payroll')")
    for command in COMMANDS:
        result = invoke(command[0], pg_url, *command[1:])
        assert result.exit_code == EXIT_USAGE, result.output
        assert "of another application" in result.output
    assert sql(pg_url, "SELECT * FROM actors_meta") == [("application", "payroll")]


# -- without psycopg ------------------------------------------------------------------------


def test_sqlite_users_need_no_psycopg(tmp_path: Path) -> None:
    db = str(tmp_path / "app.db")

    async def nothing(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async def make() -> None:
        async with actors.run_system(db, handler=nothing) as system:
            await system.send("s", 1)
            await system.drain()

    trio.run(make)

    def run(target: str) -> subprocess.CompletedProcess[str]:
        # A process of its own, where psycopg cannot be imported.
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.modules['psycopg'] = None\n"
                "from actors._cli import main\n"
                f"main(['status', {target!r}])",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )

    sqlite = run(db)
    assert sqlite.returncode == EXIT_OK, sqlite.stderr
    assert "stopped: no system is running" in sqlite.stdout
    postgres = run("postgresql://me@127.0.0.1/x")
    assert postgres.returncode == EXIT_USAGE, postgres.stderr
    assert "needs psycopg: pip install 'actors[postgres]'" in postgres.stderr


def test_the_demo_refuses_a_url() -> None:
    result = invoke("demo", "--db", f"postgresql://me:{SECRET}@127.0.0.1/x")
    assert result.exit_code == EXIT_USAGE
    assert "the demo runs on an SQLite file, not a PostgreSQL URL" in result.output


def test_a_url_is_shown_without_its_password() -> None:
    assert is_url("postgresql://h/db") and is_url("postgres://h/db")
    assert not is_url("app.db") and not is_url("postgresql.db") and not is_url(None)
    assert redact("postgresql://me:pw@h:5432/db") == "postgresql://me:***@h:5432/db"
    assert redact("postgresql://me@h/db") == "postgresql://me@h/db"
    assert redact("postgresql://h/db?password=pw&sslmode=require") == (
        "postgresql://h/db?password=***&sslmode=require"
    )
    assert redact("postgresql://me:pw@[::1/db") == "postgresql://(unparsable URL)"
    url = "postgresql://me:p%40ss@h/db"  # "p@ss", written encoded
    assert redact(url) == "postgresql://me:***@h/db"
    assert hide_password(f'no luck with "{url}" (p@ss)', url) == (
        'no luck with "postgresql://me:***@h/db" (***)'
    )


async def test_what_a_dead_member_left_in_flight_is_not_aborted(pg_url: str) -> None:
    ids = await fill(pg_url)
    # As if the member had died mid-message: b's head still claimed, and no
    # member alive to take its bucket over.
    head = ids["pending"][0]
    sql(pg_url, "UPDATE actors_messages SET state = 1 WHERE id = %s", (head,))
    st = as_json(invoke("status", pg_url, "--json"))
    assert (st["in_flight"], st["handed"], st["pending"]) == (1, 0, 3)
    assert [m["id"] for m in st["in_flight_messages"]] == [head]
    assert "left by a process that died" in invoke("status", pg_url).output
    refused = await ainvoke("abort", pg_url, "--id", str(head))
    assert refused.exit_code == EXIT_FAILED
    assert f"message {head} is in flight and cannot be aborted now" in refused.output
    purged = await ainvoke("purge", pg_url, "--session", "b")
    assert purged.output.startswith("purged 2 message(s)")  # not the one in flight
    assert sql(pg_url, "SELECT id FROM actors_messages WHERE session_id = 'b'") == [(head,)]


async def test_each_request_is_applied_by_one_member_of_several(pg_url: str) -> None:
    async def nothing(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    outcomes: list[dict[str, Any]] = []

    async def ask(n: int) -> None:
        # The command line's own request (in a worker thread: it polls).
        args = {"session": f"s{n}", "dead": False, "older_than": None}
        outcomes.append(
            await trio.to_thread.run_sync(lambda: request(pg_url, "purge", args, wait=30))
        )

    async with (
        actors.run_system(pg_url, handler=nothing, control_interval=0.01) as one,
        actors.run_system(pg_url, handler=nothing, control_interval=0.01) as two,
    ):
        for n in range(3):
            await one.send(f"s{n}", "later", delay=3600)
        async with trio.open_nursery() as nursery:
            for n in range(12):
                nursery.start_soon(ask, n)
        applied = one._control.statistics().applied + two._control.statistics().applied
    assert applied == 12  # (SKIP LOCKED: a request taken by one member is not the other's)
    assert sorted(o["count"] for o in outcomes) == [0] * 9 + [1] * 3
    assert sql(pg_url, "SELECT count(*) FROM actors_control WHERE done_at IS NULL") == [(0,)]
    assert sql(pg_url, "SELECT count(*) FROM actors_messages") == [(0,)]


async def test_a_request_held_by_a_dead_member_is_taken_again(pg_url: str) -> None:
    async def nothing(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(pg_url, handler=nothing, control_interval=3600) as system:
        await trio.testing.wait_all_tasks_blocked()  # (its control task had its first look)
        sql(
            pg_url,
            "INSERT INTO actors_members (id, host, pid, seen_until)"
            " VALUES ('busy', 'elsewhere', 1, now() + interval '1 hour'),"
            " ('dead', 'elsewhere', 2, now() - interval '1 second')",
        )
        for taker in ("busy", "dead"):
            sql(
                pg_url,
                "INSERT INTO actors_control (command, args, requested_at, result)"
                " VALUES ('retry', '{\"all\": true}', 0, %s)",
                (json.dumps({"status": "applying", "member": taker}),),
            )
        await system._control.serve()
        assert system._control.statistics().applied == 1
    rows = sql(pg_url, "SELECT result, done_at IS NOT NULL FROM actors_control ORDER BY id")
    assert json.loads(rows[0][0])["member"] == "busy" and rows[0][1] is False  # still its
    assert json.loads(rows[1][0])["ok"] is True and rows[1][1] is True  # applied here
