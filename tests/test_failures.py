"""Failed attempts: retries with backoff, dead letters, timeouts, kills, restarts."""

from __future__ import annotations

import itertools

import apsw
import pytest
import trio
from dbrows import is_postgres, query

import actors
from actors.store.buckets import bucket_of


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


FAST_RETRY = actors.Backoff(initial=1.0, multiplier=2.0, maximum=60.0, jitter=0.0)


class Boom(Exception):
    pass


async def test_exception_retries_with_backoff_then_succeeds(
    db_path: str, autojump_clock: object
) -> None:
    starts: list[tuple[int, float]] = []
    instances: list[Flaky] = []

    class Flaky(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            instances.append(self)

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            starts.append((msg.attempt, trio.current_time()))
            if msg.attempt < 3:
                raise Boom(f"attempt {msg.attempt}")

    async with actors.run_system(db_path, handler=Flaky, retry_backoff=FAST_RETRY) as system:
        await system.send("s", "x")
        await system.drain()
        stats = system.statistics()
    assert [a for a, _ in starts] == [1, 2, 3]
    # Backoff: 1 s before the 2nd attempt, 2 s before the 3rd (no jitter).
    assert starts[1][1] - starts[0][1] == pytest.approx(1.0, abs=0.01)
    assert starts[2][1] - starts[1][1] == pytest.approx(2.0, abs=0.01)
    assert len({id(i) for i in instances}) == 3  # a fresh instance after each crash
    assert stats.failed_attempts == 2 and stats.restarts == 2 and stats.processed == 1


async def test_dead_letter_after_max_attempts_then_session_goes_on(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[tuple[object, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))
        if msg.body == "poison":
            raise Boom("cannot digest")

    async with actors.run_system(db_path, handler=handler, retry_backoff=FAST_RETRY) as system:
        poison_id = await system.send("s", "poison")
        await system.send("s", "after")
        await system.drain()
        dead = system.dead_letters()
        stats = system.statistics()
    assert seen == [("poison", 1), ("poison", 2), ("poison", 3), ("poison", 4), ("after", 1)]
    (letter,) = dead
    assert letter.id == poison_id
    assert letter.session_id == "s"
    assert letter.body == "poison"
    assert letter.attempts == 4  # default max_attempts: one try and three retries
    assert "Boom: cannot digest" in letter.last_error
    assert "Traceback" in letter.last_error and "test_failures.py" in letter.last_error
    assert stats.dead == 1 and stats.dead_lettered == 1 and stats.processed == 1


async def test_retry_holds_back_the_messages_behind_it(
    db_path: str, autojump_clock: object
) -> None:
    order: list[tuple[int, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        order.append((msg.body, msg.attempt))
        if msg.body == 1 and msg.attempt == 1:
            raise Boom

    async with actors.run_system(db_path, handler=handler, retry_backoff=FAST_RETRY) as system:
        for i in range(4):
            await system.send("s", i)
        await system.drain()
    assert order == [(0, 1), (1, 1), (1, 2), (2, 1), (3, 1)]


async def test_handler_timeout_cancels_and_counts_as_failed_attempt(
    db_path: str, autojump_clock: object
) -> None:
    attempts: list[int] = []
    cancelled: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        attempts.append(msg.attempt)
        try:
            await trio.sleep(100 if msg.attempt < 2 else 1)
        except trio.Cancelled:
            cancelled.append(msg.attempt)
            raise

    async with actors.run_system(
        db_path, handler=handler, handler_timeout=10, retry_backoff=FAST_RETRY
    ) as system:
        start = trio.current_time()
        await system.send("s", 1)
        await system.drain()
        elapsed = trio.current_time() - start
        assert system.statistics().failed_attempts == 1
    assert attempts == [1, 2]
    assert cancelled == [1]
    assert 11 <= elapsed < 13  # timed out at 10 s, 1 s backoff, 1 s second attempt


async def test_timeouts_until_dead_name_the_timeout(db_path: str, autojump_clock: object) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep_forever()

    async with actors.run_system(
        db_path, handler=handler, handler_timeout=1, max_attempts=2, retry_backoff=FAST_RETRY
    ) as system:
        await system.send("s", 1)
        await system.drain()
        (letter,) = system.dead_letters()
    assert letter.attempts == 2
    assert "HandlerTimeoutError" in letter.last_error


async def test_a_timeout_and_a_kill_are_told_apart_on_the_one_scope(
    db_path: str, autojump_clock: object
) -> None:
    """The incarnation's one cancel scope is cancelled by the handler timeout
    and by kill() alike (actors/_actor.py, _incarnation): each attempt must
    still end as the one that happened. Four sessions, max_attempts=1, so
    each dead letter names its attempt's failure:

    - "plain": the handler outlives handler_timeout. A timeout: stopped()
      runs (after a checkpoint: it must not run in the cancelled scope).
    - "raises": the handler turns the timeout's Cancelled into an error. Still
      a timeout, and stopped() runs.
    - "both": the timeout comes while the handler is shielded, then a kill:
      the kill wins, and stopped() does not run.
    - "stopping": a timeout, then a kill while stopped() runs: the kill
      reaches stopped() and the attempt ends killed.
    """
    stopped: list[str] = []
    in_stopped = trio.Event()

    class Session(actors.Actor):
        ran = False  # this incarnation ran the message (later ones stop too)

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            self.ran = True
            if ctx.session_id == "raises":
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    raise RuntimeError("cleanup failed") from None
            if ctx.session_id == "both":
                with trio.CancelScope(shield=True):
                    await trio.sleep(3)  # the timeout (1 s) and the kill (2 s) wait
            await trio.sleep_forever()

        async def stopped(self, ctx: actors.Context) -> None:
            await trio.lowlevel.checkpoint()
            if not self.ran:
                return
            if ctx.session_id == "stopping":
                in_stopped.set()
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    stopped.append("stopping (cancelled)")
                    raise
            stopped.append(ctx.session_id)

    with trio.fail_after(60):
        async with actors.run_system(
            db_path, handler=Session, handler_timeout=1, max_attempts=1
        ) as system:
            start = trio.current_time()
            for session in ("plain", "raises", "both", "stopping"):
                await system.send(session, session)
            await trio.sleep_until(start + 2)
            assert system.kill("both")  # its timeout is pending, behind the shield
            await in_stopped.wait()
            assert system.kill("stopping")  # the scope of stopped() is reachable
            await system.drain()
            letters = {letter.session_id: letter.last_error for letter in system.dead_letters()}
    assert sorted(stopped) == ["plain", "raises", "stopping (cancelled)"]
    assert set(letters) == {"plain", "raises", "both", "stopping"}
    for session, expected in (
        ("plain", "HandlerTimeoutError"),
        ("raises", "HandlerTimeoutError"),
        ("both", "ActorKilledError"),
        ("stopping", "ActorKilledError"),
    ):
        assert expected in letters[session], (session, letters[session])


async def test_kill_mid_message_redelivers_with_next_attempt(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()
    seen: list[tuple[int, int]] = []
    finished: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))
        if msg.attempt == 1 and msg.body == 0:
            entered.set()
            await trio.sleep_forever()
        finished.append(msg.body)

    async with actors.run_system(db_path, handler=handler, retry_backoff=FAST_RETRY) as system:
        assert system.kill("nobody") is False
        await system.send("s", 0)
        await system.send("s", 1)
        await entered.wait()
        assert system.kill("s") is True
        await system.drain()
        stats = system.statistics()
    assert seen == [(0, 1), (0, 2), (1, 1)]
    assert finished == [0, 1]
    assert stats.restarts == 1 and stats.failed_attempts == 1


async def test_repeated_kills_end_in_dead_letters(db_path: str, autojump_clock: object) -> None:
    entered = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        entered.set()
        await trio.sleep_forever()

    async with actors.run_system(
        db_path, handler=handler, max_attempts=3, retry_backoff=FAST_RETRY, handler_timeout=None
    ) as system:
        await system.send("s", "x")
        for _ in range(3):
            await entered.wait()
            entered = trio.Event()
            assert system.kill("s")
        await system.drain()
        (letter,) = system.dead_letters()
    assert letter.attempts == 3
    assert "ActorKilledError" in letter.last_error


async def test_restart_policy_backoff_and_decay(autojump_clock: object) -> None:
    from actors._policy import RestartTracker

    policy = actors.RestartPolicy(
        max_restarts=3, window=10.0, backoff=actors.Backoff(initial=1, multiplier=2, jitter=0)
    )
    tracker = RestartTracker(policy)
    assert tracker.record("s", 0.0) == (1.0, False)
    assert tracker.record("s", 1.0) == (2.0, False)
    assert tracker.record("s", 2.0) == (4.0, False)
    delay, suspended = tracker.record("s", 3.0)
    assert suspended and delay == pytest.approx(7.0)  # until the first restart leaves the window
    # Restarts decay: long after, the count starts over (no permanent cap).
    assert tracker.record("s", 100.0) == (1.0, False)
    assert tracker.recent("s", 100.0) == 1
    assert tracker.record("other", 100.0) == (1.0, False)


async def test_crash_looping_started_hook_is_suspended_not_spinning(
    db_path: str, autojump_clock: object
) -> None:
    starts: list[float] = []

    class Broken(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            starts.append(trio.current_time())
            raise Boom("cannot start")

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            pass

    policy = actors.RestartPolicy(
        max_restarts=3, window=60.0, backoff=actors.Backoff(initial=1, jitter=0)
    )
    async with actors.run_system(
        db_path, handler=Broken, restart_policy=policy, idle_timeout=5, max_attempts=5
    ) as system:
        await system.send("s", 1)
        with trio.fail_after(200):
            await system.drain()
        # Each failed start is charged to the head message (invariant 5: no
        # crash loop): it ends in dead letters after max_attempts starts.
        stats = system.statistics()
        assert (stats.pending, stats.dead) == (0, 1)
        [letter] = system.dead_letters()
        assert letter.attempts == 5 and "cannot start" in letter.last_error
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 1, 2, 4 s backoff, then suspended until the window has room (~60 s after the first).
    assert gaps[:3] == [pytest.approx(1), pytest.approx(2), pytest.approx(4)]
    assert gaps[3] >= 50
    assert len(starts) == 5, (
        starts
    )  # bounded: no tight crash loop, and no start after the last attempt


async def test_undecodable_row_is_dead_lettered_with_a_reason(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "ok")
        await system.drain()
    if is_postgres(db_path):  # (the row's bucket; no body at all is its "not text")
        bucket = bucket_of("s", 1024)
        query(
            db_path,
            "INSERT INTO messages (id, session_id, bucket, seq, state, attempts, body,"
            " enqueued_at) VALUES (1000, 's', ?, 1000, 0, 0, '{not json', 0),"
            " (1001, 's', ?, 1001, 0, 0, NULL, 0)",
            (bucket, bucket),
        )
    else:
        query(
            db_path,
            "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
            " VALUES (1000, 's', 1000, 0, 0, '{not json', 0), (1001, 's', 1001, 0, 0, 12, 0)",
        )
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "after")
        await system.drain()
        dead = system.dead_letters()
    assert seen == ["ok", "after"]
    assert [d.id for d in dead] == [1000, 1001]
    assert "not valid JSON" in dead[0].last_error
    assert "unexpected SQLite type" in dead[1].last_error


async def test_handler_exception_does_not_escape_run_system(db_path: str) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        raise ValueError("handler bug")

    async with actors.run_system(
        db_path, handler=handler, max_attempts=1, retry_backoff=FAST_RETRY
    ) as system:
        await system.send("s", 1)
        await system.drain()
        assert system.statistics().dead == 1


async def test_store_failure_surfaces_from_run_system(db_path: str) -> None:
    """The database failing stops the system with StoreError: no hang, no silent loss."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    with pytest.raises(actors.StoreError):
        async with actors.run_system(db_path, handler=handler) as system:
            await system.send("s", 1)
            # (On PostgreSQL sends have operations of their own.)
            store = system._store
            ops = getattr(store, "_sends_ops", None) or store._ops  # type: ignore[attr-defined]
            original = ops.append

            def failing(*args: object) -> object:
                raise apsw.IOError("disk I/O error (injected)")

            ops.append = failing
            try:
                with pytest.raises(actors.StoreError):
                    await system.send("s", 2)
            finally:
                ops.append = original
            await trio.sleep_forever()  # the system fails; this is cancelled
    # The acknowledged message is still there for the next run.
    seen: list[int] = []

    async def record(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=record) as system:
        await system.drain()
    assert 2 not in seen


async def test_watchdog_times_out_a_late_handler_of_a_busy_actor(
    db_path: str, autojump_clock: object
) -> None:
    """Many quick handlers, longer in all than the timeout, then one that hangs.

    The watchdog's entry for the actor is re-armed to each later handler's
    deadline; the hanging one is cancelled exactly one timeout after it started.
    """
    started: dict[int, float] = {}
    cancelled_at: list[float] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        started.setdefault(msg.body, trio.current_time())
        if msg.body == 50 and msg.attempt == 1:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled_at.append(trio.current_time())
                raise
        await trio.sleep(1)

    async with actors.run_system(
        db_path, handler=handler, handler_timeout=5, retry_backoff=FAST_RETRY
    ) as system:
        await system.send_many([("busy", i) for i in range(51)])
        await system.send("other", "x")  # another actor, watched at the same time
        await system.drain()
        stats = system.statistics()
        watchdog = system._sup.watchdog.statistics()
    assert cancelled_at == [pytest.approx(started[50] + 5, abs=1e-6)]
    assert stats.failed_attempts == 1 and watchdog.timeouts == 1
