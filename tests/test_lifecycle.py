"""Start, recovery, the database lock, passivation, delays and shutdown."""

from __future__ import annotations

import gc
import os
import tracemalloc
import weakref
from collections.abc import Awaitable, Iterator

import apsw
import pytest
import trio
import trio.testing
from deadprocess import mark_in_flight_started
from helpers import Blocking, rerun, rows

import actors


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def left_by_a_dead_process(db_path: str, insert: str) -> None:
    """Create the database, then write rows as a crashed process would have left them."""
    async with actors.run_system(db_path, handler=noop):
        pass
    conn = apsw.Connection(db_path)
    conn.execute(insert)
    conn.close()
    mark_in_flight_started(db_path)  # their handlers had started


async def test_second_system_on_same_file_fails_at_once_naming_the_owner(db_path: str) -> None:
    import os

    async with actors.run_system(db_path, handler=noop):
        with pytest.raises(actors.DatabaseInUseError, match=f"pid {os.getpid()}") as info:
            async with actors.run_system(db_path, handler=noop):
                pass  # pragma: no cover
        assert info.value.path.endswith("actors.db")
    # The lock goes away on exit.
    async with actors.run_system(db_path, handler=noop) as system:
        await system.send("s", 1)
        await system.drain()


async def test_startup_recovery_requeues_in_flight_at_once_oldest_first(
    db_path: str, autojump_clock: object
) -> None:
    # A crashed process left: session b's message in flight (attempt 1 used),
    # and pending work for a (newer head) and c (oldest head).
    await left_by_a_dead_process(
        db_path,
        "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at) VALUES"
        " (10, 'c', 10, 0, 0, '\"c1\"', 0),"
        " (11, 'b', 11, 1, 1, '\"b1\"', 0),"
        " (12, 'a', 12, 0, 0, '\"a1\"', 0),"
        " (13, 'b', 13, 0, 0, '\"b2\"', 0)",
    )
    seen: list[tuple[object, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler, max_active=1) as system:
        assert system.recovered == 1
        start = trio.current_time()
        await system.drain()  # nothing was sent: recovery alone starts the work
        assert trio.current_time() - start < 1  # no stuck timer
    # max_active=1 runs sessions one at a time, oldest head first: c, b, a.
    assert seen == [("c1", 1), ("b1", 2), ("b2", 1), ("a1", 1)]
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


async def test_passivation_after_idle_timeout(db_path: str, autojump_clock: object) -> None:
    async with actors.run_system(db_path, handler=noop, idle_timeout=30) as system:
        await system.send("s", 1)
        await system.drain()
        assert system.is_active("s")
        await trio.sleep(29)
        assert system.is_active("s")
        await trio.sleep(2)
        assert not system.is_active("s")
        assert system.statistics().active_actors == 0


async def test_message_sent_while_actor_passivates_is_not_stranded(
    db_path: str, autojump_clock: object
) -> None:
    """A send that lands while the actor runs its stopped() hook on the way out."""
    seen: list[int] = []
    stopping = trio.Event()
    proceed = trio.Event()

    class Session(actors.Actor):
        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            seen.append(msg.body)

        async def stopped(self, ctx: actors.Context) -> None:
            if not stopping.is_set():
                stopping.set()
                await proceed.wait()

    async with actors.run_system(db_path, handler=Session, idle_timeout=5) as system:
        await system.send("s", 1)
        await system.drain()
        await stopping.wait()  # the actor is leaving
        await system.send("s", 2)  # lands while it leaves
        proceed.set()
        await system.drain()  # processed without another send
    assert seen == [1, 2]


async def test_passivation_race_many_rounds(db_path: str, autojump_clock: object) -> None:
    """Sends timed right at the idle deadline, over and over: none is stranded."""
    seen: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler, idle_timeout=1) as system:
        for i in range(200):
            await system.send("s", i)
            await trio.sleep(1 + (i % 5 - 2) * 1e-3)
        await system.drain()
    assert seen == list(range(200))


async def test_delayed_message_waits_on_a_timer(db_path: str, autojump_clock: object) -> None:
    seen: list[tuple[object, float]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, trio.current_time()))

    async with actors.run_system(db_path, handler=handler) as system:
        start = trio.current_time()
        await system.send("s", "later", delay=60)
        await system.send("s", "now")
        await system.send("t", "soon", delay=5)
        assert system.statistics().pending >= 2  # delayed messages count as pending
        await system.drain()  # waits for the delayed ones
        assert system._timer.fired == 2
    assert [b for b, _ in seen] == ["now", "soon", "later"]
    times = {b: t - start for b, t in seen}
    assert times["now"] < 1
    assert times["soon"] == pytest.approx(5, abs=0.01)
    assert times["later"] == pytest.approx(60, abs=0.01)


async def test_delayed_message_enters_queue_when_due(db_path: str, autojump_clock: object) -> None:
    """A delayed message goes behind what the session received before it became due."""
    seen: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)
        await trio.sleep(1)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "delayed", delay=2.5)
        for i in range(5):  # queued at once: all of them are ahead of "delayed"
            await system.send("s", f"m{i}")
        await trio.sleep(10)
        await system.send("s", "late")  # after "delayed" entered the queue
        await system.drain()
    assert seen == ["m0", "m1", "m2", "m3", "m4", "delayed", "late"]


async def test_delayed_message_survives_restart(db_path: str, autojump_clock: object) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        await system.send("s", "later", delay=3600)
    seen: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        assert system.statistics().pending == 1
        await system.drain()
    assert seen == ["later"]


async def test_graceful_shutdown_lets_handlers_finish(db_path: str, autojump_clock: object) -> None:
    handler = Blocking(3)
    async with actors.run_system(db_path, handler=handler, shutdown_timeout=10) as system:
        await system.send("s", 1)
        await system.send("s", 2)
        await handler.entered.wait()
    assert handler.done == [1]  # finished; the next one was not started
    assert rows(db_path, "SELECT body, state, attempts FROM messages") == [("2", 0, 0)]


async def test_shutdown_timeout_cancels_and_keeps_the_message_pending(
    db_path: str, autojump_clock: object
) -> None:
    stuck = Blocking()
    async with actors.run_system(db_path, handler=stuck, shutdown_timeout=2) as system:
        await system.send("s", 1)
        await stuck.entered.wait()
        stop_at = trio.current_time()
    assert trio.current_time() - stop_at == pytest.approx(2, abs=0.01)
    assert stuck.cancelled == [1]
    # Pending again. The attempt stays counted: the handler ran, so the
    # redelivery must say so.
    assert rows(db_path, "SELECT body, state, attempts FROM messages") == [("1", 0, 1)]
    assert await rerun(db_path) == [(1, 2)]


async def test_exception_in_body_stops_system_and_keeps_work(db_path: str) -> None:
    entered = trio.Event()

    async def stuck(ctx: actors.Context, msg: actors.Message) -> None:
        entered.set()
        await trio.sleep_forever()

    with pytest.raises(KeyError):
        async with actors.run_system(db_path, handler=stuck) as system:
            await system.send("s", 1)
            await entered.wait()
            raise KeyError("user bug")
    assert rows(db_path, "SELECT state, attempts, crashed FROM messages") == [(0, 1, 0)]


async def test_no_task_outlives_run_system(db_path: str) -> None:
    before = len(trio.lowlevel.current_root_task().child_nurseries[0].child_tasks)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.lowlevel.checkpoint()

    async with actors.run_system(db_path, handler=handler) as system:
        for i in range(20):
            await system.send(f"s{i}", i)
        await system.drain()
    after = len(trio.lowlevel.current_root_task().child_nurseries[0].child_tasks)
    assert after == before
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("actors-store")]


async def test_newer_schema_version_is_refused(db_path: str) -> None:
    conn = apsw.Connection(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(actors.SchemaVersionError, match="newer"):
        async with actors.run_system(db_path, handler=noop):
            pass  # pragma: no cover


async def test_file_that_is_not_a_database_is_refused(db_path: str) -> None:
    await trio.Path(db_path).write_bytes(b"this is not an SQLite database, just some text" * 100)
    with pytest.raises(actors.StoreError, match="not"):
        async with actors.run_system(db_path, handler=noop):
            pass  # pragma: no cover


@pytest.mark.parametrize("path", ["", ":memory:", "file:x?mode=memory"])
async def test_path_must_be_a_file(path: str) -> None:
    with pytest.raises(ValueError):
        async with actors.run_system(path, handler=noop):
            pass  # pragma: no cover


async def test_crash_suspects_on_their_last_attempt_run_alone(
    db_path: str, autojump_clock: object
) -> None:
    """Messages in flight when the process died, one attempt from the end, run alone."""
    # A dead process left two messages in flight on their 2nd of 3 attempts,
    # plus ordinary pending work in other sessions.
    await left_by_a_dead_process(
        db_path,
        "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at) VALUES"
        " (1, 'p', 1, 1, 2, '\"suspect-p\"', 0),"
        " (2, 'q', 2, 1, 2, '\"suspect-q\"', 0),"
        " (3, 'x', 3, 0, 0, '\"x\"', 0),"
        " (4, 'y', 4, 0, 0, '\"y\"', 0)",
    )
    running: set[str] = set()
    overlaps: list[tuple[str, frozenset[str]]] = []
    seen: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body.startswith("suspect") and running:
            overlaps.append((msg.body, frozenset(running)))
        if running & {"p", "q"}:
            overlaps.append((msg.body, frozenset(running)))
        running.add(ctx.session_id)
        await trio.sleep(1)
        running.discard(ctx.session_id)
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler, max_attempts=3) as system:
        await system.drain()
        assert system.dead_letters() == []
    assert not overlaps
    assert sorted(seen) == [("suspect-p", 3), ("suspect-q", 3), ("x", 1), ("y", 1)]


async def test_suspect_that_ran_alone_and_died_is_dead_lettered(db_path: str) -> None:
    # In flight, alone, on its last attempt, when the process died.
    await left_by_a_dead_process(
        db_path,
        "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at, alone)"
        " VALUES (1, 'p', 1, 1, 3, '\"poison\"', 0, 1), (2, 'p', 2, 0, 0, '\"next\"', 0, 0)",
    )
    seen: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler, max_attempts=3) as system:
        await system.drain()
        (letter,) = system.dead_letters()
    assert seen == ["next"]
    assert letter.body == "poison" and letter.attempts == 3
    assert "ran alone" in letter.last_error


async def test_stop_is_not_missed_by_an_actor_restarting_at_that_moment(db_path: str) -> None:
    """An actor inside a claim when stop() wakes everyone must still stop at once.

    Real clock and the store's committer (the race needs a claim in flight,
    queued for its transaction while other tasks run); a hang would last the
    whole 60 s grace period, far past the fail_after that catches it.
    """

    async def always_fails(ctx: actors.Context, msg: actors.Message) -> None:
        raise RuntimeError("always fails")

    no_wait = actors.Backoff(initial=0.0, maximum=0.0, jitter=0.0)
    for _ in range(20):
        with trio.fail_after(20):
            async with actors.run_system(
                db_path,
                handler=always_fails,
                max_attempts=1,
                retry_backoff=no_wait,
                restart_policy=actors.RestartPolicy(backoff=no_wait),
                shutdown_timeout=60,
            ) as system:
                await system.send("s", 1)
                await system.drain()


async def test_an_idle_actor_keeps_nothing_of_the_messages_it_handled(
    db_path: str, clock: object
) -> None:
    """Once handled, a message and its handler's result are freed, though the actor stays.

    An idle actor waits for up to ``idle_timeout``, and ``max_active`` of
    them may wait at once: whatever one keeps of its last message (the
    body, the handler's result, the claim it came with) is memory held for
    nothing. The ways in: claimed by a new actor; handed to an idle one at
    insert; claimed with the one queued behind it (``mailbox_size=1``);
    and a claim that finds nothing after a handler (what was queued behind
    was purged meanwhile).
    """

    class Result:
        pass

    handled: list[weakref.ref[object]] = []
    gate = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> Result:
        if msg.body == b"wait":
            await gate.wait()
        result = Result()
        handled.extend([weakref.ref(msg), weakref.ref(result)])
        return result

    async with actors.run_system(db_path, handler=handler, mailbox_size=1) as system:
        await system.send("claimed", b"x" * 1000)  # a new actor claims it
        await system.drain()
        await system.send("claimed", b"y" * 1000)  # handed to the idle actor at insert
        await system.drain()
        await system.send_many([("bulk", b"z" * 1000)] * 3)  # claimed with those behind it
        await system.drain()
        # While "wait" runs, what is queued behind it is purged.
        await system.send_many([("purged", b"wait"), ("purged", b"2"), ("purged", b"3")])
        await trio.testing.wait_all_tasks_blocked()
        purged = await system.purge(session_id="purged")
        assert purged in (1, 2)  # (one may be in flight already, claimed with "wait")
        gate.set()
        await system.drain()
        await trio.testing.wait_all_tasks_blocked()
        assert all(system.is_active(s) for s in ("claimed", "bulk", "purged"))
        gc.collect()
        assert len(handled) == 2 * (8 - purged)
        alive = [i for i, ref in enumerate(handled) if ref() is not None]
        assert alive == []


async def test_nothing_of_a_sent_batch_stays_in_memory(db_path: str, clock: object) -> None:
    """Once a batch is committed and handled, its bodies are freed at once.

    The router and the committer wait for the next batch, maybe for a
    long time: whatever they keep of the last one (a ``send_many`` of
    large bodies) is memory held for nothing. Twice: a batch handled at
    once, and a batch left pending in the database (the only slot is busy),
    whose commit is the committer's last.
    """
    gate = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == b"wait":
            await gate.wait()

    def large_bodies(sessions: int) -> Iterator[tuple[str, bytes]]:
        return ((f"s{i % sessions}", os.urandom(50_000)) for i in range(40))  # 2 MB

    async def held_after(send: Awaitable[object]) -> tuple[int, int]:
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        tracemalloc.start()
        try:
            await send
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            return tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    async with actors.run_system(db_path, handler=handler, max_active=1) as system:
        await system.send("warm", b"")
        await system.drain()

        async def handled() -> None:
            await system.send_many(large_bodies(1))
            await system.drain()

        held, peak = await held_after(handled())
        assert peak > 2_000_000  # the bodies were there
        assert held < 200_000
        await system.send("busy", b"wait")  # takes the one slot
        held, peak = await held_after(system.send_many(large_bodies(4)))
        stats = system.statistics()
        assert (stats.pending, stats.in_flight) == (40, 1)  # "busy" holds the slot
        assert peak > 2_000_000
        assert held < 200_000
        gate.set()
        await system.drain()
