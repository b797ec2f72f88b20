"""The fake store keeps the Store protocol's contract, and does what the SQLite store does.

The first tests hold operations (``MemoryStore.hold``) to check the
contract itself: submission order, an ack box joined while it waits, a
sealed append that others pass, operations that cannot be cancelled, and a
failure that fails the store. The last one runs the same random operations
on a ``SqliteStore`` and a ``MemoryStore`` and compares every result and
every row: where they differ, the fake is wrong (the SQLite store is the
reference), and the unit tests of the actor built on it would be too.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing
from helpers import rows
from memstore import IN_FLIGHT, MemoryStore

from actors._errors import StoreError
from actors.store import Ack, AppendBatch, Claim
from actors.store.sqlite import SqliteStore


def batch(sessions: list[str], claimed: set[int] | None = None) -> AppendBatch:
    bodies = [f'"{s}{i}"' for i, s in enumerate(sessions)]
    return (sessions, bodies, [0.0] * len(sessions), None, claimed or set(), None, 0.0)


async def test_operations_commit_in_the_order_they_were_called(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    first = store.put("s", 1).id
    store.put("s", 2)
    held = store.hold("claim_next")
    done: list[str] = []
    async with trio.open_nursery() as nursery:

        async def claim() -> None:
            claim = await store.claim_next("s", None, 0.0, 4, False, bulk=0)
            assert claim.message is not None and claim.message.id == first
            done.append("claim_next")

        nursery.start_soon(claim)
        await held.reached()
        # Called after the held claim: they wait behind it, whoever calls.
        store.ack_soon(first, lambda result: done.append(f"ack_soon {result[0]}"))
        store.after_commits(lambda: done.append("after_commits"))
        assert store.waiting == ["claim_next", "ack_soon", "after_commits"]
        assert store.state_of(first) == "pending" and done == []
        held.release()
    assert done == ["ack_soon 1", "after_commits", "claim_next"]  # (callbacks run at commit)
    assert store.committed == ["claim_next", "ack_soon", "after_commits"]
    assert store.state_of(first) == "gone"


async def test_acks_queued_while_their_box_waits_share_it(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    ids = [store.put("s", i, state=IN_FLIGHT, attempts=1).id for i in range(3)]
    held = store.hold("ack_soon")
    results: list[tuple[int, Any]] = []
    for msg_id in ids:
        store.ack_soon(msg_id, results.append)
    await held.reached()
    assert store.waiting == ["ack_soon"]  # one box, in the queue where its first ack was
    held.release()
    assert results == [(3, None)]  # one done() for the box: three acks
    store.ack_soon(ids[0], results.append)  # a later ack opens a new box
    assert results == [(3, None), (1, None)]


async def test_an_append_held_before_its_seal_lets_later_operations_pass(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    held = store.hold("append")
    sealed: list[int] = []

    def seal() -> AppendBatch:
        sealed.append(store.next_seq)
        return batch(["s"], {0})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.append, seal)
        await held.reached()
        assert sealed == []  # not yet sealed
        row = store.put("s", "before")  # pending when the batch is sealed
        await store.heartbeat("{}")  # called after the append, commits first
        held.release()
    assert sealed == [row.id + 1]
    assert store.committed == ["heartbeat", "append"]
    # Sealed after "before" was queued: inserted pending, not claimed (no overtaking).
    assert store.summary() == {row.id: ("pending", 0), row.id + 1: ("pending", 0)}


async def test_an_append_held_after_its_seal_waits_in_line(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    held = store.hold("append", after_seal=True)
    claimed: set[int] = {0}

    def seal() -> AppendBatch:
        return (["s"], ['"x"'], [0.0], None, claimed, None, 0.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.append, seal)
        await held.reached()
        nursery.start_soon(store.heartbeat, "{}")
        await trio.testing.wait_all_tasks_blocked()
        assert store.waiting == ["append", "heartbeat"]
        held.release()
    assert store.committed == ["append", "heartbeat"]
    assert claimed == {0} and store.summary() == {1: ("in flight", 1)}  # claimed on delivery


async def test_a_caller_cancelled_while_it_waits_still_learns_the_outcome(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    row = store.put("s", 1)
    held = store.hold("claim_next")
    got: list[Claim] = []
    scope = trio.CancelScope()

    async def claim() -> None:
        with scope:
            got.append(await store.claim_next("s", None, 0.0, 4, False))
            await trio.lowlevel.checkpoint()  # the cancellation lands here
            raise AssertionError("not reached")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim)
        await held.reached()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # still waiting, cancelled or not
        held.release()
    assert scope.cancelled_caught
    assert got[0].message is not None and got[0].message.id == row.id
    assert store.summary() == {row.id: ("in flight", 1)}


async def test_a_failed_operation_writes_nothing_and_fails_the_store(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    row = store.put("s", 1)
    store.fail_next("claim_next", "disk on fire")
    with pytest.raises(StoreError, match="disk on fire"):
        await store.claim_next("s", None, 0.0, 4, False)
    assert store.summary() == {row.id: ("pending", 0)}
    assert store.failed.is_set() and "disk on fire" in str(store.failure)
    with pytest.raises(StoreError, match="failed earlier"):
        store.ack_soon(row.id, lambda result: None)
    with pytest.raises(StoreError, match="failed earlier"):
        await store.heartbeat("{}")


async def test_a_held_operation_made_to_fail_raises_to_its_caller(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    held = store.hold("heartbeat")
    async with trio.open_nursery() as nursery:

        async def beat() -> None:
            with pytest.raises(StoreError, match="lost"):
                await store.heartbeat("{}")

        nursery.start_soon(beat)
        await held.reached()
        held.fail("lost")
    assert store.failed.is_set() and store.heartbeat_value is None


async def test_recovery_keeps_the_attempts_of_started_messages_and_gives_back_the_rest(
    still_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    started = store.put("s", 1, state=IN_FLIGHT, attempts=2)
    handed = store.put("s", 2, state=IN_FLIGHT, attempts=1)
    other = store.put("t", 3, state=IN_FLIGHT, attempts=1)  # no mark: never started
    store.marks.mark(store.marks.acquire(), started.id)
    assert store.recover() == 3
    assert store.summary() == {
        started.id: ("pending", 2),
        handed.id: ("pending", 0),
        other.id: ("pending", 0),
    }
    assert started.crashed and not handed.crashed and not other.crashed


# -- the same as the SQLite store -------------------------------------------------------

SESSIONS = ["a", "b", "c"]
TIMES = [0.0, 5.0, 10.0, 15.0, 20.0]


def sqlite_rows(path: str) -> list[tuple[Any, ...]]:
    found = rows(
        path,
        "SELECT id, session_id, seq, state, attempts, body, enqueued_at, not_before,"
        " last_error, crashed, alone, key FROM messages ORDER BY id",
    )
    return [tuple(r) for r in found]


def memory_rows(store: MemoryStore) -> list[tuple[Any, ...]]:
    return [
        (
            r.id,
            r.session_id,
            r.seq,
            int(r.state),
            r.attempts,
            r.body,
            r.enqueued_at,
            r.not_before,
            r.last_error,
            int(r.crashed),
            int(r.alone),
            r.key,
        )
        for r in sorted(store.messages.values(), key=lambda r: r.id)
    ]


def plain(result: object) -> object:
    """A result as comparable data (a Claim's fields; collections in a set order)."""
    if isinstance(result, Claim):
        message = result.message
        return (
            None if message is None else (message.id, message.body, message.attempt, message.key),
            result.seq,
            result.wait_until,
            result.dead,
            result.alone,
            result.more,
            [(m.id, m.body, m.attempt) for m in result.extra],
            result.state,
            result.sent,
        )
    if hasattr(result, "retry_sessions"):  # DueWork: the sessions come in no set order
        return (result.promoted, sorted(result.retry_sessions), result.more)  # type: ignore[attr-defined]
    return result


class Script:
    """Random operations of the runtime, each made twice: for each store."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _ids(self, store: MemoryStore) -> list[int]:
        return sorted(store.messages) or [1]

    def operation(self, store: MemoryStore) -> tuple[str, tuple[Any, ...]]:
        """The next operation (its name and arguments), from the fake's current rows."""
        rng = self.rng
        ids = self._ids(store)
        name = rng.choice(
            ["append"] * 4
            + ["claim_next"] * 4
            + ["ack", "fail", "release", "release", "release_many", "defer_head", "next_due"]
            + ["collect_due", "sessions_with_work", "oldest_due", "retry_dead", "abort"]
            + ["purge", "load_state", "sweep_keys"]
        )
        session = rng.choice(SESSIONS)
        now = rng.choice(TIMES)
        if name == "append":
            return name, (self._batch(),)
        if name == "claim_next":
            ack = rng.choice([None, None, rng.choice(ids), self._ack(rng.choice(ids), session)])
            alone = rng.random() < 0.3
            return name, (session, ack, now, rng.choice([1, 2, 3]), alone, rng.choice([0, 2, 5]))
        if name == "ack":
            return name, (rng.choice([rng.choice(ids), self._ack(rng.choice(ids), session)]),)
        if name == "fail":
            return name, (rng.choice(ids), "boom", now + rng.choice([0, 3, 8]), rng.choice([1, 3]))
        if name == "release":
            return name, (rng.choice(ids), rng.random() < 0.5, rng.random() < 0.5)
        if name == "release_many":
            return name, (rng.sample(ids, min(len(ids), 2)),)
        if name == "defer_head":
            return name, (session, now + 4)
        if name in ("next_due", "oldest_due"):
            return name, (now,)
        if name == "collect_due":
            return name, (rng.choice([0.0, 5.0]), now, rng.choice([1, 100]))
        if name == "sessions_with_work":
            return name, (rng.choice([1, 10]), frozenset(rng.sample(SESSIONS, 1)))
        if name == "retry_dead":
            return name, (rng.choice([None, rng.choice(ids)]),)
        if name == "abort":
            return name, (rng.choice(ids), rng.random() < 0.5)
        if name == "purge":
            return name, (
                rng.choice([None, session]),
                rng.random() < 0.5,
                rng.choice([None, 7.0]),
                rng.choice([1, 100]),
            )
        if name == "sweep_keys":
            return name, (now, 100)
        return name, (session,)  # load_state

    def _batch(self) -> tuple[Any, ...]:
        rng = self.rng
        n = rng.randint(1, 4)
        sessions = [rng.choice(SESSIONS) for _ in range(n)]
        kinds: list[str | bytes] = ['"x"', "[1, 2]", b"raw", "{not json"]  # (one undecodable)
        bodies = [rng.choice(kinds) for _ in range(n)]
        enqueued = [rng.choice(TIMES) for _ in range(n)]
        delayed = rng.random() < 0.2
        not_before = [rng.choice([None, 12.0]) for _ in range(n)] if delayed else None
        keyed = not delayed and rng.random() < 0.2
        keys = [rng.choice([None, "k1", "k2"]) for _ in range(n)] if keyed else None
        claimed = set(rng.sample(range(n), rng.randint(0, n))) if not keyed else set()
        return (sessions, bodies, enqueued, not_before, claimed, keys, 10.0)

    def _ack(self, msg_id: int, session: str) -> Ack:
        rng = self.rng
        sent: list[tuple[str, str | bytes, float]] = [(rng.choice(SESSIONS), '"sent"', 3.0)]
        outbox = sent if rng.random() < 0.5 else None
        state = rng.choice([None, '{"n": 1}'])
        return Ack(msg_id, session, state, outbox, rng.choice([None, "k1"]), 6.0)


async def call(store: Any, name: str, args: tuple[Any, ...]) -> object:
    if name == "append":
        fields = args[0]
        claimed = set(fields[4])  # (each store narrows its own copy)
        result = await store.append(lambda: (*fields[:4], claimed, *fields[5:]))
        return (result, sorted(claimed))
    if name == "claim_next":
        session, ack, now, max_attempts, alone, bulk = args
        return await store.claim_next(
            session, ack, now, max_attempts, alone, want_state=True, bulk=bulk
        )
    return await getattr(store, name)(*args)


@pytest.mark.parametrize("seed", range(12))
async def test_the_fake_does_what_the_sqlite_store_does(
    db_path: str, still_clock: trio.testing.MockClock, seed: int
) -> None:
    sqlite, _ = await SqliteStore.open(db_path, durability="normal", busy_timeout=5.0)
    memory = MemoryStore()
    script = Script(seed)
    try:
        for step in range(400):
            name, args = script.operation(memory)
            want = plain(await call(sqlite, name, args))
            got = plain(await call(memory, name, args))
            assert got == want, f"step {step}: {name}{args}"
            assert memory_rows(memory) == sqlite_rows(db_path), f"step {step}: {name}{args}"
            assert memory.next_seq == sqlite.next_seq
            assert [(d.id, d.attempts, d.last_error) for d in memory.dead_letters(None, None)] == [
                (d.id, d.attempts, d.last_error) for d in sqlite.dead_letters(None, None)
            ]
    finally:
        await sqlite.aclose()
