"""The control table, System.purge, and apply(): safe changes while a system runs.

A request written into ``control`` is applied by the running system through
its own methods, so that its in-memory counts (``statistics()``, what
``drain()`` waits for) stay true; a bad request gets an error outcome and
never stops the system.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import apsw
import pytest
import trio

import actors
import actors._control as control
import actors._purge
from actors._control import RequestTimeoutError, apply, request


async def fail(ctx: actors.Context, msg: actors.Message) -> None:
    raise ValueError(f"cannot handle {msg.body!r}")


def sql(path: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = apsw.Connection(path)
    try:
        conn.set_busy_timeout(5000)
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def db_counts(path: str) -> tuple[int, int]:
    """(pending + in flight, dead) in the database."""
    rows = dict(sql(path, "SELECT state = 2, count(*) FROM messages GROUP BY state = 2"))
    return rows.get(0, 0), rows.get(1, 0)


def assert_counts_agree(system: actors.System) -> None:
    stats = system.statistics()
    assert (stats.pending + stats.in_flight, stats.dead) == db_counts(system.path)


# -- System.purge -------------------------------------------------------------------


async def test_purge_a_session_deletes_its_pending_and_dead_but_not_in_flight(
    db_path: str, autojump_clock: object
) -> None:
    running = trio.Event()
    release = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "hold":
            running.set()
            await release.wait()
        elif msg.body == "bad":
            raise ValueError("bad")

    async with actors.run_system(
        db_path, handler=handler, max_attempts=1, handler_timeout=None
    ) as system:
        await system.send("s", "bad")
        await system.send("other", "bad")
        await system.drain()  # a dead letter of each
        held = await system.send("s", "hold")
        await running.wait()
        await system.send("s", "later", delay=60)
        await system.send("s", "next", key="k")
        assert system.statistics().dead == 2
        purged = await system.purge(session_id="s")
        assert purged == 3  # the dead letter, the delayed one, the keyed one
        assert [r[0] for r in sql(db_path, "SELECT id FROM messages WHERE session_id = 's'")] == [
            held
        ]
        assert sql(db_path, "SELECT count(*) FROM keys") == [(0,)]  # the key is forgotten
        assert_counts_agree(system)
        release.set()
        await system.drain()  # does not wait for the purged messages
        # A send with the purged key is new work again.
        assert await system.send("s", "again", key="k") > held
        await system.drain()
        assert_counts_agree(system)
        assert system.statistics().dead == 1  # other's


async def test_purge_dead_letters_by_age(db_path: str, autojump_clock: object) -> None:
    async with actors.run_system(db_path, handler=fail, max_attempts=1) as system:
        old = [await system.send(f"s{i}", i) for i in range(3)]
        await system.drain()
        await trio.sleep(3600)
        new = await system.send("s0", "new")
        await system.drain()
        assert system.statistics().dead == 4
        assert await system.purge(dead=True, older_than=7200) == 0
        assert await system.purge(dead=True, session_id="s1", older_than=1800) == 1
        assert await system.purge(dead=True, older_than=1800) == 2
        assert [d.id for d in system.dead_letters()] == [new]
        assert old[0] not in [d.id for d in system.dead_letters()]
        assert system.statistics().dead == 1
        assert await system.purge(dead=True) == 1
        assert system.statistics().dead == 0
        assert_counts_agree(system)


async def test_purge_refuses_what_it_cannot_mean(db_path: str, autojump_clock: object) -> None:
    async with actors.run_system(db_path, handler=fail) as system:
        with pytest.raises(ValueError, match="needs a session_id"):
            await system.purge()
        with pytest.raises(ValueError, match="older_than applies to dead letters"):
            await system.purge(session_id="s", older_than=10)
        with pytest.raises(ValueError, match="older_than"):
            await system.purge(dead=True, older_than=-1)
        with pytest.raises(TypeError, match="older_than"):
            await system.purge(dead=True, older_than="7d")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await system.purge(session_id="")
    with pytest.raises(actors.SystemClosedError):
        await system.purge(dead=True)


async def test_purge_works_in_batches(
    db_path: str, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actors._purge, "PURGE_LIMIT", 3)
    async with actors.run_system(db_path, handler=fail, max_attempts=1) as system:
        await system.send_many([(f"s{i}", i) for i in range(10)])
        await system.drain()
        commits = system.statistics().commits
        assert await system.purge(dead=True) == 10
        assert system.statistics().commits - commits == 4  # 3 + 3 + 3 + 1
        assert system.statistics().dead == 0


# -- apply(): the outcome of a command --------------------------------------------


async def test_apply_words_outcomes_and_refuses_bad_requests(
    db_path: str, autojump_clock: object
) -> None:
    async with actors.run_system(db_path, handler=fail, max_attempts=1) as system:
        dead_id = await system.send("s", 1)
        await system.drain()
        assert await apply(system, "retry", json.dumps({"id": dead_id + 100})) == {
            "ok": False,
            "error": f"message {dead_id + 100} is not a dead letter",
        }
        assert await apply(system, "abort", '{"id": 999}') == {
            "ok": False,
            "error": "no pending or dead message 999",
        }
        for command, args in [
            ("reboot", "{}"),
            ("retry", "not json"),
            ("retry", "[1]"),
            ("retry", '{"id": "1"}'),
            ("retry", '{"id": true}'),
            ("abort", "{}"),
            ("purge", "{}"),
            ("purge", '{"dead": "yes"}'),
            ("purge", '{"session": 5}'),
            ("purge", '{"dead": true, "older_than": -5}'),
        ]:
            outcome = await apply(system, command, args)
            assert outcome["ok"] is False, (command, args)
            assert outcome["error"], (command, args)
        assert "unknown command 'reboot'" in (await apply(system, "reboot", "{}"))["error"]
        assert await apply(system, "retry", '{"all": true}') == {
            "ok": True,
            "count": 1,
            "detail": "requeued 1 dead letter(s)",
        }
        await system.drain()
        assert await apply(system, "abort", json.dumps({"id": dead_id})) == {
            "ok": True,
            "count": 1,
            "detail": f"aborted message {dead_id}",
        }
        assert_counts_agree(system)


# -- the control table while a system runs -------------------------------------------


def put_request(path: str, command: str, args: object) -> int:
    conn = apsw.Connection(path)
    try:
        conn.execute(
            "INSERT INTO control (command, args, requested_at) VALUES (?, ?, ?)",
            (command, json.dumps(args), time.time()),
        )
        return conn.last_insert_rowid()
    finally:
        conn.close()


def outcome_of(path: str, request_id: int) -> dict[str, Any] | None:
    rows = sql(path, "SELECT done_at, result FROM control WHERE id = ?", (request_id,))
    if not rows or rows[0][0] is None:
        return None
    result: dict[str, Any] = json.loads(rows[0][1])
    return result


async def test_requests_in_the_control_table_are_applied_in_order(
    db_path: str, autojump_clock: object
) -> None:
    async with actors.run_system(db_path, handler=fail, max_attempts=1) as system:
        ids = [await system.send(f"s{i}", i) for i in range(4)]
        await system.drain()
        assert system.statistics().dead == 4
        # Abort a dead letter, then retry them all: the order matters.
        first = put_request(db_path, "abort", {"id": ids[0]})
        second = put_request(db_path, "retry", {"all": True})
        bogus = put_request(db_path, "format-disk", {})
        assert outcome_of(db_path, first) is None
        await trio.sleep(2 * system.config.control_interval)
        assert outcome_of(db_path, first) == {
            "ok": True,
            "count": 1,
            "detail": f"aborted message {ids[0]}",
        }
        second_outcome = outcome_of(db_path, second)
        assert second_outcome is not None and second_outcome["count"] == 3
        bogus_outcome = outcome_of(db_path, bogus)
        assert bogus_outcome is not None and bogus_outcome["ok"] is False
        stats = system._control.statistics()
        assert (stats.applied, stats.refused) == (3, 1)
        await system.drain()  # the three retried messages failed again
        assert system.statistics().dead == 3
        assert_counts_agree(system)
        # The system is still up and working.
        purge = put_request(db_path, "purge", {"dead": True})
        await trio.sleep(2 * system.config.control_interval)
        assert outcome_of(db_path, purge) == {
            "ok": True,
            "count": 3,
            "detail": "purged 3 message(s)",
        }
        assert system.statistics().dead == 0
        assert_counts_agree(system)


async def test_an_idle_control_table_costs_no_transaction(
    db_path: str, autojump_clock: object
) -> None:
    async with actors.run_system(db_path, handler=fail, status_interval=3600) as system:
        await trio.sleep(1)  # the tasks' first steps
        commits = system.statistics().commits
        await trio.sleep(100)
        assert system._control.statistics().looks >= 200
        assert system.statistics().commits == commits


async def test_a_request_taken_by_a_system_that_died_is_applied_by_the_next(
    db_path: str, autojump_clock: object
) -> None:
    async with actors.run_system(db_path, handler=fail, max_attempts=1) as system:
        dead_id = await system.send("s", 1)
        await system.drain()
    taken = put_request(db_path, "abort", {"id": dead_id})
    sql(db_path, 'UPDATE control SET result = \'{"status": "applying"}\' WHERE id = ?', (taken,))
    async with actors.run_system(db_path, handler=fail) as system:
        await trio.sleep(2 * system.config.control_interval)
        assert outcome_of(db_path, taken) == {
            "ok": True,
            "count": 1,
            "detail": f"aborted message {dead_id}",
        }
        assert system.statistics().dead == 0


async def test_finished_requests_are_forgotten_after_a_week(
    db_path: str, autojump_clock: object
) -> None:
    async with actors.run_system(db_path, handler=fail, status_interval=3600, control_interval=600):
        old = put_request(db_path, "retry", {"all": True})
        await trio.sleep(1200)
        assert outcome_of(db_path, old) is not None
        await trio.sleep(control.CONTROL_RETENTION)
        new = put_request(db_path, "retry", {"all": True})
        await trio.sleep(1200)
        assert outcome_of(db_path, new) is not None
        assert [r[0] for r in sql(db_path, "SELECT id FROM control")] == [new]


# -- request(): the command line's side -------------------------------------------


async def test_a_request_nobody_takes_is_withdrawn_on_timeout(db_path: str) -> None:
    async with actors.run_system(db_path, handler=fail):
        pass
    with pytest.raises(RequestTimeoutError, match="withdrawn: nothing was changed") as caught:
        await trio.to_thread.run_sync(
            lambda: request(db_path, "retry", {"all": True}, wait=0.05, poll=0.01)
        )
    assert caught.value.withdrawn
    assert sql(db_path, "SELECT count(*) FROM control") == [(0,)]


async def test_a_request_taken_but_not_finished_in_time_stays(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real clock: the system takes the request, then takes longer than --wait."""
    entered = threading.Event()
    go_on = trio.Event()
    real_apply = control.apply

    async def slow_apply(target: Any, command: str, args: str) -> dict[str, Any]:
        entered.set()
        await go_on.wait()
        return await real_apply(target, command, args)

    monkeypatch.setattr(control, "apply", slow_apply)
    async with actors.run_system(db_path, handler=fail, control_interval=0.01) as system:

        def ask() -> None:
            request(db_path, "retry", {"all": True}, wait=0.5, poll=0.01)

        with pytest.raises(RequestTimeoutError, match="the system took it") as caught:
            await trio.to_thread.run_sync(ask)
        assert entered.is_set()
        assert not caught.value.withdrawn
        go_on.set()  # and stop the system at once
    # A request taken is answered before the system stops, never left hanging.
    assert system._control.statistics().applied == 1
    assert outcome_of(db_path, caught.value.request_id) == {
        "ok": False,
        "error": "SystemClosedError: the system is shutting down",
    }
