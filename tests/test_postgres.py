"""The PostgreSQL store on a real server: one system, and several in one run as a cluster.

Several systems in one trio run on one database are several members of a
cluster, as processes would be (each has its own member id, connections and
leases); what needs real processes (SIGKILL, SIGSTOP) is in
test_postgres_processes.py. Lease rounds follow the database's clock, in real
time: where a test waits for one, it polls the cluster's statistics with a
deadline (``until``), since no event of ours can say the server's clock moved.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pgserver
import psycopg
import pytest
import trio
import trio.lowlevel

import actors
from actors.store import postgres_schema
from actors.store.buckets import bucket_of

TTL = 1.0  # lease_ttl of the cluster tests: a round every quarter second


async def until(system: actors.System, condition: Callable[[], bool], what: str) -> None:
    """Wait, lease round after lease round of ``system``, for what the database's clock decides."""
    cluster = system._store.cluster
    assert cluster is not None
    with trio.fail_after(30):
        while not condition():
            await cluster.next_round()
    assert condition(), what


@asynccontextmanager
async def two_members(
    url: str, handler: Any, prefix: str, **options: Any
) -> AsyncIterator[tuple[actors.System, actors.System, str]]:
    """Two members of one cluster with a bucket each, and a session that the
    second one runs (its id starts with ``prefix``)."""
    options = {"buckets": 2, "lease_ttl": TTL, **options}
    async with (
        actors.run_system(url, handler=handler, **options) as a,
        actors.run_system(url, handler=handler, **options) as b,
    ):
        await until(
            a, lambda: ownership(a).owned == 1 and ownership(b).owned == 1, "one bucket each"
        )
        cluster_b = b._store.cluster
        assert cluster_b is not None
        theirs = next(s for s in (f"{prefix}{i}" for i in range(1000)) if cluster_b.owns(s))
        yield a, b, theirs


def ownership(system: actors.System) -> Any:
    cluster = system._store.cluster
    assert cluster is not None
    return cluster.statistics()


def session_in(bucket: int, buckets: int, prefix: str = "s") -> str:
    """A session id that hashes into ``bucket``."""
    for i in range(100_000):
        if bucket_of(f"{prefix}{i}", buckets) == bucket:
            return f"{prefix}{i}"
    raise AssertionError("no such session")


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


# -- one system ----------------------------------------------------------------


async def test_messages_state_ask_and_dead_letters(pg_url: str) -> None:
    seen: list[tuple[str, Any]] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == "poison":
            raise ValueError("bad")
        seen.append((msg.session_id, msg.body))
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return msg.body

    async with actors.run_system(pg_url, handler=handle, max_attempts=2) as system:
        for i in range(30):
            await system.send(f"s{i % 3}", i)
        await system.send("s9", "poison")
        assert await system.ask("s1", "hello", timeout=30) == "hello"
        await system.drain()
        stats = system.statistics()
        assert stats.pending == 0 and stats.in_flight == 0
        assert stats.dead == 1
        dead = system.dead_letters()
        assert [d.body for d in dead] == ["poison"]
        assert "ValueError" in dead[0].last_error
    for s in ("s0", "s1", "s2"):
        got = [b for sid, b in seen if sid == s]
        assert got == sorted(got, key=lambda b: (isinstance(b, str), b))  # FIFO per session
    states = dict(sql(pg_url, "SELECT session_id, value FROM actors_state"))
    assert states == {"s0": '{"n":10}', "s1": '{"n":11}', "s2": '{"n":10}'}
    # Acked rows are deleted: only the dead letter is left.
    assert sql(pg_url, "SELECT count(*) FROM actors_messages") == [(1,)]


async def test_keyed_sends_and_delays(pg_url: str, autojump_clock: trio.abc.Clock) -> None:
    got: list[Any] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        got.append(msg.body)

    async with actors.run_system(pg_url, handler=handle) as system:
        first = await system.send("k", "a", key="one")
        again = await system.send("k", "b", key="one")
        assert again == first
        await system.send("k", "later", delay=60)
        await system.send("k", "now")
        await system.drain()
    assert got == ["a", "now", "later"]


async def test_restart_keeps_pending_messages(pg_url: str) -> None:
    started = trio.Event()

    async def slow(ctx: actors.Context, msg: actors.Message) -> None:
        started.set()
        await trio.sleep_forever()

    async with actors.run_system(pg_url, handler=slow, shutdown_timeout=0.01) as system:
        for i in range(5):
            await system.send("r", i)
        await started.wait()
    got: list[Any] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        got.append((msg.body, msg.attempt))

    async with actors.run_system(pg_url, handler=handle) as system:
        await system.drain()
    assert got == [(0, 2), (1, 1), (2, 1), (3, 1), (4, 1)]


# -- options and bad input ----------------------------------------------------------


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


@pytest.mark.parametrize("option", [{"durability": "full"}, {"busy_timeout": 1.0}])
async def test_sqlite_options_are_refused_on_postgres(option: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="means nothing on PostgreSQL"):
        async with actors.run_system("postgresql://nobody@127.0.0.1:1/x", handler=noop, **option):
            pass


@pytest.mark.parametrize("option", [{"lease_ttl": 5.0}, {"buckets": 16}])
async def test_cluster_options_are_refused_on_sqlite(tmp_path: Any, option: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="PostgreSQL only"):
        async with actors.run_system(str(tmp_path / "a.db"), handler=noop, **option):
            pass
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ({"lease_ttl": 0}, ValueError),
        ({"lease_ttl": "10"}, TypeError),
        ({"lease_ttl": float("nan")}, ValueError),
        ({"buckets": 0}, ValueError),
        ({"buckets": 1 << 20}, ValueError),
        ({"buckets": 2.0}, TypeError),
        ({"buckets": True}, TypeError),
    ],
)
async def test_bad_cluster_options(option: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        async with actors.run_system("postgresql://nobody@127.0.0.1:1/x", handler=noop, **option):
            pass


async def test_unreachable_server_is_a_clear_store_error() -> None:
    with pytest.raises(actors.StoreError, match="cannot connect to PostgreSQL at") as info:
        async with actors.run_system("postgresql://u:secret@127.0.0.1:1/x", handler=noop):
            pass
    assert "secret" not in str(info.value)


async def test_wrong_database_name(pg_server: str) -> None:
    url = pg_server.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(actors.StoreError, match="no_such_database"):
        async with actors.run_system(url, handler=noop):
            pass


async def test_database_of_another_application_is_refused(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE actors_messages (id int)")
    with pytest.raises(actors.StoreError, match="refusing"):
        async with actors.run_system(pg_url, handler=noop):
            pass
    sql(pg_url, "DROP TABLE actors_messages")
    sql(pg_url, "CREATE TABLE actors_meta (key text, value text)")
    sql(pg_url, "INSERT INTO actors_meta VALUES ('application', 'other')")
    with pytest.raises(actors.StoreError, match="another application"):
        async with actors.run_system(pg_url, handler=noop):
            pass


async def test_newer_schema_is_refused(pg_url: str) -> None:
    async with actors.run_system(pg_url, handler=noop):
        pass
    sql(pg_url, "UPDATE actors_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(actors.SchemaVersionError, match="upgrade actors"):
        async with actors.run_system(pg_url, handler=noop):
            pass


async def test_no_index_of_the_queue_names_state(pg_url: str) -> None:
    """A claim changes a message's state: an index that named it (in its
    columns or its predicate) would make every claim's update a non-HOT
    one, with new entries in every index."""
    async with actors.run_system(pg_url, handler=noop):
        pass
    indexes = sql(pg_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'actors_messages'")
    assert len(indexes) == 5
    assert not [d for (d,) in indexes if "state" in d]


async def test_a_version_1_database_is_migrated(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        for statement in postgres_schema._SCHEMA_V1:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO actors_meta (key, value) VALUES ('application', 'actors'),"
            " ('schema_version', '1'), ('buckets', '4'), ('next_id', '100'), ('processed', '0')"
        )
        conn.execute("INSERT INTO actors_buckets (bucket) SELECT generate_series(0, 3)")
        conn.execute(
            "INSERT INTO actors_messages (id, session_id, bucket, seq, state, attempts, body,"
            " enqueued_at, last_error) VALUES (1, 'a', %s, 1, 2, 5, '\"dead\"', 0, 'boom'),"
            " (2, 'b', %s, 2, 0, 0, '\"pending\"', 0, NULL)",
            (bucket_of("a", 4), bucket_of("b", 4)),
        )
    seen: list[Any] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(pg_url, handler=handle) as system:
        await system.drain()
        assert seen == ["pending"]
        [dead] = system.dead_letters()
        assert (dead.id, dead.body, dead.last_error) == (1, "dead", "boom")
        assert await system.retry_dead(1) == 1
        await system.drain()
        assert seen == ["pending", "dead"]
    assert sql(pg_url, "SELECT value FROM actors_meta WHERE key = 'schema_version'") == [
        (str(postgres_schema.SCHEMA_VERSION),)
    ]
    indexes = sql(pg_url, "SELECT indexdef FROM pg_indexes WHERE tablename = 'actors_messages'")
    assert not [d for (d,) in indexes if "state" in d]


async def test_buckets_are_fixed_when_created(pg_url: str) -> None:
    async with actors.run_system(pg_url, handler=noop, buckets=8) as system:
        assert ownership(system).buckets == 8
    async with actors.run_system(pg_url, handler=noop) as system:  # the database's
        assert ownership(system).buckets == 8
    with pytest.raises(ValueError, match="created with 8 buckets"):
        async with actors.run_system(pg_url, handler=noop, buckets=16):
            pass


# -- a cluster in one run ---------------------------------------------------------


async def test_members_share_the_buckets_and_route_sends(pg_url: str) -> None:
    ran: dict[str, list[Any]] = {"a": [], "b": []}
    all_ran = trio.Event()

    def recorder(name: str) -> Any:
        async def handle(ctx: actors.Context, msg: actors.Message) -> None:
            ran[name].append((msg.session_id, msg.body))
            if len(ran[name]) == 10:
                all_ran.set()

        return handle

    options: dict[str, Any] = {"buckets": 8, "lease_ttl": TTL}
    async with actors.run_system(pg_url, handler=recorder("a"), **options) as a:
        assert ownership(a).owned == 8
        async with actors.run_system(pg_url, handler=recorder("b"), **options) as b:
            await until(
                a, lambda: ownership(a).owned == 4 and ownership(b).owned == 4, "an even split"
            )
            cluster_b = b._store.cluster
            assert cluster_b is not None
            theirs = next(s for s in (f"x{i}" for i in range(100)) if cluster_b.owns(s))
            for i in range(10):
                await a.send(theirs, i)  # sent by a, run by b
            with trio.fail_after(30):
                await all_ran.wait()
            assert ran["b"] == [(theirs, i) for i in range(10)]
            assert ran["a"] == []
        # b left cleanly: its buckets come back to a within a round.
        await until(a, lambda: ownership(a).owned == 8, "a took b's buckets back")
        assert ownership(a).released == 4


async def test_a_lost_bucket_fences_writes_and_cancels_handlers(pg_url: str) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        started.set()
        ctx.state["touched"] = True
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with actors.run_system(pg_url, handler=handle, buckets=4, lease_ttl=TTL) as system:
        session = session_in(2, 4)
        await system.send(session, "x")
        await started.wait()
        # Another process takes the bucket (as after this one froze past its lease).
        sql(
            pg_url,
            "UPDATE actors_buckets SET owner = 'thief', epoch = epoch + 1,"
            " lease_until = now() + interval '1 hour' WHERE bucket = 2",
        )
        with trio.fail_after(10):
            await cancelled.wait()
        await until(system, lambda: ownership(system).lost == 1, "the bucket is lost")
        assert ownership(system).owned == 3
        assert not system._store.cluster.owns(session)  # type: ignore[union-attr]
    # Nothing of the old owner landed: the message is still claimed (in
    # flight) under the thief, and no state was written.
    assert sql(pg_url, "SELECT state FROM actors_messages") == [(1,)]
    assert sql(pg_url, "SELECT count(*) FROM actors_state") == [(0,)]


async def test_ask_is_answered_across_members_and_drain_is_cluster_wide(pg_url: str) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> Any:
        if msg.body == "raise":
            raise KeyError("nope")
        if msg.body == "bytes":
            return b"\x00\x01"
        if msg.body == "object":
            return object()  # cannot cross processes
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        return {"echo": msg.body, "n": ctx.state["n"]}

    async with two_members(pg_url, handle, "q", max_attempts=1) as (a, b, theirs):
        assert await a.ask(theirs, "hi", timeout=30) == {"echo": "hi", "n": 1}
        assert await a.ask(theirs, "bytes", timeout=30) == b"\x00\x01"
        with pytest.raises(actors.RemoteHandlerError, match="KeyError") as info:
            await a.ask(theirs, "raise", timeout=30)
        assert info.value.type_name == "KeyError"
        assert "Traceback" in info.value.text
        with pytest.raises(actors.RemoteHandlerError, match="cannot be sent"):
            await a.ask(theirs, "object", timeout=30)
        # Sent by a, run by b: a's drain waits for b's work.
        for i in range(50):
            await a.send(theirs, i)
        await a.drain()
        stats = a.statistics()
        assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 1)
        await b.drain()
        assert b.statistics().processed == 53  # two answered asks, the unsendable value, 50
        # b's count reaches a's statistics with b's next lease renewal.
        await until(a, lambda: a.statistics().processed == 53, "a sees what b processed")
        assert sql(pg_url, "SELECT count(*) FROM actors_replies") == [(0,)]


async def test_subscribe_streams_outputs_of_a_session_run_elsewhere(pg_url: str) -> None:
    async def handle(ctx: actors.Context, msg: actors.Message) -> Any:
        await ctx.emit({"emitted": msg.body})
        return msg.body * 10

    async with two_members(pg_url, handle, "o") as (a, b, theirs):
        got: list[Any] = []
        async with a.subscribe(theirs) as outputs:
            # The owner learns of the subscriber through the database.
            await until(b, lambda: theirs in b._sup.outputs.remote, "b knows a listens")
            for i in range(1, 4):
                await a.send(theirs, i)
            with trio.fail_after(30):
                async for value in outputs:
                    got.append(value)
                    if len(got) == 6:
                        break
        assert got == [
            {"emitted": 1}, 10, {"emitted": 2}, 20, {"emitted": 3}, 30,
        ]  # fmt: skip
        # Unsubscribed: the owner stops forwarding.
        await until(b, lambda: theirs not in b._sup.outputs.remote, "b knows a left")
        await a.send(theirs, 4)
        await a.drain()
    assert sql(pg_url, "SELECT count(*) FROM actors_outputs") == [(0,)]
    assert sql(pg_url, "SELECT count(*) FROM actors_subscribers") == [(0,)]


# -- faults of the server and the network -------------------------------------------


def kill_connections(url: str) -> int:
    """Terminate every other connection to the test's database (as a network cut would)."""
    rows = sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return len(rows)


async def test_connections_killed_mid_transaction_lose_nothing(pg_url: str) -> None:
    handled = trio.Event()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        handled.set()
        await trio.lowlevel.checkpoint()

    sessions = [f"c{i}" for i in range(10)]
    async with actors.run_system(pg_url, handler=handle, lease_ttl=5.0) as system:
        killed = 0
        for _ in range(5):
            handled = trio.Event()
            async with trio.open_nursery() as nursery:
                for s in sessions:
                    nursery.start_soon(send_some, system, s, 20)
                await handled.wait()  # (sends and claims are under way)
                killed += await trio.to_thread.run_sync(kill_connections, pg_url)
        assert killed >= 5
        await system.drain()
        reconnects = system._store.reconnects  # type: ignore[attr-defined]
        assert reconnects >= 1
    states = dict(sql(pg_url, "SELECT session_id, value FROM actors_state"))
    assert states == {s: '{"n":100}' for s in sessions}
    assert sql(pg_url, "SELECT count(*) FROM actors_messages") == [(0,)]


async def send_some(system: actors.System, session: str, n: int) -> None:
    for i in range(n):
        await system.send(session, i)


@pytest.fixture
def own_server(pg_server: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A throwaway server of this test's own (it restarts it), and how to restart it."""
    bindir = pgserver.find_bindir(os.environ)
    if bindir is None:  # (a server given by ACTORS_TEST_POSTGRES, no binaries here)
        pytest.skip("restarting a server needs the PostgreSQL binaries here")
    base = Path(tempfile.mkdtemp(prefix="actors-pg-restart-"))
    url = pgserver.start(bindir, base)

    def restart() -> None:
        pgserver._run(
            base, bindir / "pg_ctl", "-D", base / "data", "-l", base / "server.log", "-m", "fast",
            "-w", "restart",
        )  # fmt: skip

    try:
        yield url, restart
    finally:
        pgserver.stop(bindir, base)


async def test_the_server_restarting_under_a_running_system_loses_nothing(
    own_server: tuple[str, Callable[[], None]],
) -> None:
    url, restart = own_server

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        ctx.state["n"] = ctx.state.get("n", 0) + 1

    sessions = [f"r{i}" for i in range(5)]
    async with actors.run_system(url, handler=handle, lease_ttl=5.0) as system:
        async with trio.open_nursery() as nursery:
            for s in sessions:
                nursery.start_soon(send_some, system, s, 10)
        await system.drain()
        async with trio.open_nursery() as nursery:
            # Sends made while the server restarts wait for it, then commit.
            nursery.start_soon(trio.to_thread.run_sync, restart)
            for s in sessions:
                nursery.start_soon(send_some, system, s, 30)
        await system.drain()
        stats = system.statistics()
        assert (stats.pending, stats.in_flight, stats.dead) == (0, 0, 0)
        assert system._store.reconnects >= 1  # type: ignore[attr-defined]
    states = dict(sql(url, "SELECT session_id, value FROM actors_state"))
    assert states == {s: '{"n":40}' for s in sessions}


async def test_a_handler_that_runs_on_does_not_hold_a_handover_hostage(pg_url: str) -> None:
    """A bucket being handed over waits for its handlers to return, but not
    forever: after ``lease_ttl`` they are cancelled, the bucket moves, and the
    message runs again on the new owner."""
    started: dict[str, trio.Event] = {}
    cancelled: list[str] = []
    ran_on_b: list[str] = []
    got_one = trio.Event()

    async def stuck(ctx: actors.Context, msg: actors.Message) -> None:
        started[msg.session_id].set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(msg.session_id)
            raise

    async def quick(ctx: actors.Context, msg: actors.Message) -> None:
        ran_on_b.append(msg.session_id)
        got_one.set()

    options: dict[str, Any] = {"buckets": 2, "lease_ttl": TTL}
    sessions = [session_in(0, 2, "h"), session_in(1, 2, "h")]
    async with actors.run_system(pg_url, handler=stuck, shutdown_timeout=0.1, **options) as a:
        for s in sessions:  # both buckets busy: whichever is handed over is
            started[s] = trio.Event()
            await a.send(s, "x")
            await started[s].wait()
        async with actors.run_system(pg_url, handler=quick, **options) as b:
            with trio.fail_after(30):
                await got_one.wait()
            await until(b, lambda: ownership(b).owned == 1, "b holds one bucket")
            assert len(ran_on_b) == 1 and cancelled == ran_on_b
            assert ownership(a).owned == 1 and ownership(a).released == 1


async def test_kill_reaches_the_actor_in_another_process(pg_url: str) -> None:
    attempts: list[int] = []
    first = trio.Event()
    second = trio.Event()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            first.set()
            await trio.sleep_forever()
        second.set()

    async with two_members(pg_url, handle, "k") as (a, _, theirs):
        await a.send(theirs, "x")
        with trio.fail_after(30):
            await first.wait()
            assert a.kill(theirs)  # sent: b runs it
            await second.wait()
        await a.drain()
    assert attempts == [1, 2]


async def test_sends_during_a_handover_all_reach_a_handler(pg_url: str) -> None:
    """Two members split the buckets while both send to every session: no
    message may be left pending with no process told of it. (A send whose
    transaction saw its bucket held, and committed after the bucket was given
    back, once announced nothing to the next owner.)"""
    seen: list[Any] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    sessions = [f"h{i}" for i in range(100)]
    options: dict[str, Any] = {"lease_ttl": TTL, "buckets": 64}

    async def member(ready: trio.Event, go: trio.Event, tag: str) -> None:
        async with actors.run_system(pg_url, handler=handle, **options) as system:
            await system.send_many((s, "warm") for s in sessions)
            await system.drain()
            ready.set()
            await go.wait()
            for i in range(100):  # while the buckets move
                await system.send(sessions[i], f"{tag}{i}")
                await trio.lowlevel.checkpoint()
            with trio.fail_after(30):
                await system.drain()

    go, ready_a, ready_b = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(member, ready_a, go, "a")
        await ready_a.wait()
        nursery.start_soon(member, ready_b, go, "b")
        await ready_b.wait()
        go.set()
    assert sorted(b for b in seen if b != "warm") == sorted(
        [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(100)]
    )


@pytest.mark.parametrize("key", [None, "k2"])
async def test_a_send_after_a_claim_of_a_higher_foreign_id_wakes_the_actor(
    pg_url: str, key: str | None
) -> None:
    """Each member takes its ids in blocks of its own, so a message sent by
    another member can have a higher id than this member's next send. An
    idle actor that claimed such a message must still wake for that send (a
    notice by seq did not: the actor parked until its idle timeout)."""
    seen: list[Any] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with two_members(pg_url, handle, "w", idle_timeout=3600) as (a, b, theirs):
        first_b = await b.send(theirs, "b1")  # b's block first...
        await b.drain()
        first_a = await a.send(theirs, "a1")  # ...then a's, higher
        assert first_a > first_b
        with trio.fail_after(10):
            await b.drain()
        assert seen == ["b1", "a1"]
        second_b = await b.send(theirs, "b2", key=key)
        assert second_b < first_a
        with trio.fail_after(10):
            await b.drain()
        assert seen == ["b1", "a1", "b2"]


async def test_a_send_after_an_outbox_message_committed_comes_after_it(pg_url: str) -> None:
    """Sends and a handler's ctx.send commit on two connections of one
    process: their ids still come from one sequence, so a send made after an
    outbox message committed is behind it in its session's order (as on
    SQLite)."""
    ids: dict[str, int] = {}

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "go":
            ctx.send("dst", "from the handler")
        else:
            ids[msg.body] = msg.id

    async with actors.run_system(pg_url, handler=handle) as system:
        await system.send("src", "go")
        await system.drain()
        await system.send("dst", "sent after")
        await system.drain()
    assert ids["sent after"] > ids["from the handler"]


async def test_a_send_committed_after_its_bucket_was_lost_is_announced(pg_url: str) -> None:
    """Sends take no fence: one that saw its bucket held, and committed after
    another process took the bucket over (and looked there for work), is
    announced to the new owner once this process finds the bucket lost."""

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(pg_url, handler=handle, buckets=4, lease_ttl=TTL) as system:
        session = session_in(2, 4)
        await system.send(session, "warm")  # (the process takes its block of ids)
        await system.drain()
        listener = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_url, autocommit=True))
        blocker = await trio.to_thread.run_sync(psycopg.connect, pg_url)
        try:
            listener.execute("LISTEN actors_work")
            # The next send's insert waits for this row's transaction (its id).
            next_id = system._store._pg_ops.next_seq  # type: ignore[attr-defined]
            blocker.execute(
                "INSERT INTO actors_messages (id, session_id, bucket, state, attempts,"
                " enqueued_at) VALUES (%s, 'x', 2, 0, 0, 0)",
                (next_id,),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(system.send, session, "late")
                await until(
                    system,
                    lambda: (
                        sql(
                            pg_url,
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                        )
                        == [(1,)]
                    ),
                    "the send waits",
                )
                # Another process takes the bucket and looks: nothing there yet.
                sql(
                    pg_url,
                    "UPDATE actors_buckets SET owner = 'thief', epoch = epoch + 1,"
                    " lease_until = now() + interval '1 hour' WHERE bucket = 2",
                )
                await trio.to_thread.run_sync(blocker.rollback)  # the send commits
            assert sql(pg_url, "SELECT count(*) FROM actors_messages WHERE body = '\"late\"'") == [
                (1,)
            ]
            await until(system, lambda: ownership(system).lost == 1, "the bucket is lost")

            def told() -> bool:
                for notice in listener.notifies(timeout=10):
                    buckets = notice.payload.lstrip("d")
                    if buckets == "*" or "2" in buckets.split(","):
                        return True
                return False

            assert await trio.to_thread.run_sync(told)
        finally:
            listener.close()
            blocker.close()


async def test_a_joining_member_gets_busy_buckets_too(pg_url: str) -> None:
    """Buckets are handed over busy and idle in the proportion held: a member
    that joins gets some of the sessions at work, not only empty buckets
    (idle ones first gave it 32 buckets of 64 and none of 20 live sessions)."""
    seen: dict[str, list[str]] = {}

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        seen.setdefault(msg.body, []).append(msg.session_id)

    sessions = [f"j{i}" for i in range(20)]
    options: dict[str, Any] = {"lease_ttl": TTL, "buckets": 64, "idle_timeout": 3600}
    async with actors.run_system(pg_url, handler=handle, **options) as a:
        await a.send_many((s, "before") for s in sessions)
        await a.drain()  # (their actors stay, idle: the buckets are busy)
        async with actors.run_system(pg_url, handler=handle, **options) as b:
            await until(
                a,
                lambda: ownership(a).owned == 32 and ownership(b).owned == 32,
                "32 buckets each",
            )
            cluster_b = b._store.cluster
            assert cluster_b is not None
            assert [s for s in sessions if cluster_b.owns(s)]
            await a.send_many((s, "after") for s in sessions)
            with trio.fail_after(30):
                await a.drain()
    assert sorted(seen["after"]) == sorted(sessions)
