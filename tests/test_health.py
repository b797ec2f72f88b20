"""Health: healthy only while work makes progress (System.health, the heartbeat, `actors health`).

The seed's worker reported OK for weeks while nothing completed. Here a due
message that keeps ageing with nothing completing is unhealthy even though
the process is up; idle is healthy, and so is a busy system that completes
work. ``System.health()`` runs on the autojump clock; the command line's side
reads a heartbeat row that the tests write themselves.
"""

from __future__ import annotations

import json
import time

import apsw
import attrs
import pytest
import trio
from click.testing import CliRunner
from helpers import heartbeat_fields

import actors
from actors._admin import default_stale_after
from actors._cli import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, cli
from actors._health import Heartbeat, judge
from actors._lock import DatabaseLock


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


# -- the rule -------------------------------------------------------------------


def test_the_rule_needs_both_an_old_due_message_and_no_progress() -> None:
    assert judge(oldest_pending_age=None, last_progress_age=1e9, stall_after=60) == (
        True,
        "idle: no message is due",
    )
    assert judge(oldest_pending_age=59, last_progress_age=1e9, stall_after=60)[0]
    assert judge(oldest_pending_age=1e9, last_progress_age=59, stall_after=60)[0]
    healthy, reason = judge(oldest_pending_age=61, last_progress_age=61, stall_after=60)
    assert not healthy
    assert reason.startswith("stalled: ")


# -- System.health() --------------------------------------------------------------


async def test_an_idle_system_is_healthy(db_path: str, autojump_clock: object) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        await trio.sleep(600)
        health = await system.health()
        assert health.healthy
        assert health.oldest_pending_age is None
        assert health.last_progress_age == pytest.approx(600, abs=2)
        assert health.reason == "idle: no message is due"


async def test_a_hanging_handler_with_ageing_work_is_unhealthy_until_work_completes(
    db_path: str, autojump_clock: object
) -> None:
    release = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await release.wait()

    async with actors.run_system(db_path, handler=handler, handler_timeout=None) as system:
        for i in range(3):
            await system.send("s", i)
        await trio.sleep(59)
        assert (await system.health()).healthy  # not yet stall_after
        await trio.sleep(2)
        health = await system.health()
        assert not health.healthy
        assert "stalled" in health.reason
        assert health.oldest_pending_age is not None and health.oldest_pending_age >= 61
        assert health.last_progress_age >= 61
        assert (health.pending, health.in_flight, health.processed) == (2, 1, 0)
        # A longer threshold tolerates it; an invalid one is refused.
        assert (await system.health(stall_after=120)).healthy
        for bad in (0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="stall_after"):
                await system.health(stall_after=bad)
        with pytest.raises(TypeError, match="stall_after"):
            await system.health(stall_after="60")  # type: ignore[arg-type]
        release.set()
        await system.drain()
        health = await system.health()
        assert health.healthy
        assert health.processed == 3
        assert health.last_progress_age < 1
    assert not (await system.health()).healthy  # a stopped system is not


async def test_old_work_is_healthy_while_other_work_completes(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.session_id == "stuck":
            await trio.sleep_forever()

    async with actors.run_system(db_path, handler=handler, handler_timeout=None) as system:
        await system.send("stuck", 0)
        for i in range(10):
            await system.send("busy", i)
            await trio.sleep(20)
        health = await system.health()
        assert health.oldest_pending_age is not None and health.oldest_pending_age > 180
        assert health.healthy, health.reason  # the system still completes work
        await trio.sleep(61)  # now nothing has completed for a while
        assert not (await system.health()).healthy


async def test_dead_letters_are_progress_and_delayed_messages_are_not_due(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        raise ValueError("always")

    async with actors.run_system(
        db_path, handler=handler, max_attempts=1, handler_timeout=None
    ) as system:
        await system.send("later", 1, delay=600)
        await trio.sleep(300)
        health = await system.health()
        assert health.healthy
        assert health.oldest_pending_age is None  # waiting for its delay is not due
        assert health.pending == 1
        await trio.sleep(301)  # it runs, fails, is dead-lettered: an outcome
        await system.drain()
        health = await system.health()
        assert health.healthy
        assert (health.dead, health.dead_lettered) == (1, 1)
        assert health.last_progress_age < 2


async def test_the_running_system_writes_a_heartbeat(db_path: str, autojump_clock: object) -> None:
    async with actors.run_system(db_path, handler=noop, status_interval=5) as system:
        await system.send("s", 1)
        await system.drain()
        await trio.sleep(5.5)
        beat = read_heartbeat(db_path)
        assert beat is not None
        assert beat.processed == 1
        assert beat.interval == 5
        assert beat.at == pytest.approx(beat.started_at + 5, abs=0.5)
        await trio.sleep(10)
        later = read_heartbeat(db_path)
        assert later is not None and later.at == pytest.approx(beat.at + 10, abs=0.5)
        assert system._health.statistics().heartbeats == 3


def read_heartbeat(path: str) -> Heartbeat | None:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT value FROM meta WHERE key = 'heartbeat'").fetchall()
    finally:
        conn.close()
    return Heartbeat.from_json(rows[0][0]) if rows else None


def test_a_heartbeat_that_is_not_one_reads_as_none() -> None:
    assert Heartbeat.from_json(None) is None
    assert Heartbeat.from_json("not json") is None
    assert Heartbeat.from_json('{"at": 1}') is None


# -- actors health DB ---------------------------------------------------------------


async def make_database(path: str, *, pending: int = 0, age: float = 0.0) -> None:
    """A database with ``pending`` messages of session "s", sent ``age`` seconds ago."""
    hold = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await hold.wait()

    async with actors.run_system(path, handler=handler, shutdown_timeout=0.01) as system:
        for i in range(pending):
            await system.send("s", i)
    conn = apsw.Connection(path)
    try:
        conn.execute("UPDATE messages SET enqueued_at = enqueued_at - ?", (age,))
        # The heartbeat the system wrote as it stopped: these tests write their own.
        conn.execute("DELETE FROM meta WHERE key = 'heartbeat'")
    finally:
        conn.close()


def write_heartbeat(path: str, *, age: float = 0.0, progress_age: float = 0.0) -> None:
    now = time.time()
    beat = Heartbeat(
        at=now - age,
        interval=1.0,
        started_at=now - 3600,
        last_progress_at=now - progress_age,
        pid=12345,
        host="test",
        processed=7,
        dead_lettered=1,
        failed_attempts=2,
        restarts=2,
        pending=0,
        in_flight=0,
        dead=0,
    )
    conn = apsw.Connection(path)
    try:
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('heartbeat', ?)", (beat.to_json(),)
        )
    finally:
        conn.close()


def health_cli(path: str, *args: str) -> tuple[int, dict[str, object]]:
    result = CliRunner().invoke(cli, ["health", path, "--json", *args])
    return result.exit_code, json.loads(result.output)


async def test_cli_health_no_system_running(db_path: str) -> None:
    await make_database(db_path)
    write_heartbeat(db_path, age=30)
    code, report = health_cli(db_path)
    assert code == EXIT_NOT_RUNNING == 3
    assert report["running"] is False and report["healthy"] is False
    assert "no system is running" in str(report["reason"])
    assert report["exit_code"] == 3
    human = CliRunner().invoke(cli, ["health", db_path])
    assert human.exit_code == 3
    assert human.output.startswith("not running: no system is running")


async def test_cli_health_of_a_running_system(db_path: str) -> None:
    await make_database(db_path, pending=3, age=600)
    lock = DatabaseLock(db_path)  # stands for the running system
    lock.acquire()
    try:
        code, report = health_cli(db_path)
        assert code == EXIT_FAILED
        assert report["reason"] == "the running system has written no heartbeat yet"

        # Old due work, but a message completed 5 s ago: making progress.
        write_heartbeat(db_path, progress_age=5)
        code, report = health_cli(db_path)
        assert code == EXIT_OK, report
        health = report["health"]
        assert isinstance(health, dict)
        assert health["pending"] == 3 and health["processed"] == 7
        assert 599 < float(health["oldest_pending_age"]) < 700

        # Nothing completed for 10 minutes while that work waits: stalled.
        write_heartbeat(db_path, progress_age=600)
        code, report = health_cli(db_path)
        assert code == EXIT_FAILED
        assert str(report["reason"]).startswith("stalled: ")
        assert health_cli(db_path, "--stall-after", "900")[0] == EXIT_OK

        # The heartbeat stopped: the loop or the store is stuck.
        write_heartbeat(db_path, age=60)
        code, report = health_cli(db_path)
        assert code == EXIT_FAILED
        assert str(report["reason"]).startswith("stuck: the last heartbeat is")
        assert report["stale_after"] == 10.0
        write_heartbeat(db_path, age=60, progress_age=30)
        assert health_cli(db_path, "--stale-after", "120")[0] == EXIT_OK
    finally:
        lock.release()


async def test_cli_health_idle_is_healthy_and_says_why(db_path: str) -> None:
    await make_database(db_path)
    lock = DatabaseLock(db_path)
    lock.acquire()
    try:
        write_heartbeat(db_path, progress_age=86400)
        result = CliRunner().invoke(cli, ["health", db_path])
        assert result.exit_code == EXIT_OK
        assert result.output.startswith("healthy: idle: no message is due")
    finally:
        lock.release()


def test_cli_health_without_a_database_is_a_usage_error(tmp_path: object) -> None:
    result = CliRunner().invoke(cli, ["health", f"{tmp_path}/missing.db"])
    assert result.exit_code == EXIT_USAGE
    assert "no database file" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_stale_after_defaults_to_five_intervals_or_ten_seconds() -> None:
    beat = Heartbeat.from_json(json.dumps(heartbeat_fields(interval=4)))
    assert beat is not None
    assert default_stale_after(beat) == 20
    assert default_stale_after(attrs.evolve(beat, interval=0.5)) == 10
