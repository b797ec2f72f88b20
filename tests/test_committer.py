"""Where the store's transactions run (see actors/store/committer.py, "Where a transaction runs").

Real clock: under a MockClock the store runs each operation inline, and none
of this applies. Each test tries to break one rule of the committer:

- a group runs on the trio thread once the loop has nothing else to run, or
  after ``IDLE_WAIT`` if it never gets there (a loop that is never idle
  still commits);
- a lock held by another connection is waited for in a worker thread, never
  on the loop;
- the COMMIT of ``durability="full"`` (its fsync) runs in the sync thread;
- WAL checkpoints run between transactions, in a worker thread, and keep
  the WAL small.
"""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing
from dblock import WriteLock

import actors
from actors.store import committer as committer_module
from actors.store import sqlite_transactions

HANG = 10.0  # seconds of real time after which a wait is a hang


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


def committer(system: actors.System) -> committer_module.Committer:
    return system._store._committer  # type: ignore[attr-defined, no-any-return]


def threads_running(target: object, method: str) -> list[int]:
    """Wrap ``target``'s ``method`` to record the thread of each call (in the list returned)."""
    threads: list[int] = []
    original = getattr(target, method)

    def recorded() -> None:
        threads.append(threading.get_ident())
        original()

    setattr(target, method, recorded)
    return threads


async def test_a_group_commits_on_the_trio_thread_once_the_loop_is_idle(db_path: str) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        threads = threads_running(committer(system), "_commit")
        with trio.fail_after(HANG):
            await system.send("s", 1)
            await system.drain()
    assert threads and set(threads) == {threading.get_ident()}


async def test_a_loop_that_is_never_idle_still_commits(db_path: str) -> None:
    """A task that always has more to run keeps the loop from ever being idle:
    the committer must not wait for that, only for ``IDLE_WAIT``."""
    spins = 0
    stop = False

    async def busy() -> None:
        nonlocal spins
        while not stop:
            spins += 1
            await trio.lowlevel.cancel_shielded_checkpoint()  # runnable again at once

    async with actors.run_system(db_path, handler=noop) as system:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(busy)
            try:
                with trio.fail_after(HANG):
                    for n in range(20):
                        await system.send("s", n)
                    await system.drain()
            finally:
                stop = True
        assert system.statistics().processed == 20
    assert spins > 0  # the busy task did run throughout


async def test_a_lock_held_by_another_connection_is_waited_for_off_the_loop(
    db_path: str,
) -> None:
    """With the write lock taken elsewhere, the batch waits in a worker thread
    (up to busy_timeout) while the loop goes on; if the store waited on the
    loop, this task could not run to release the lock, and the send would
    fail with a busy error after busy_timeout instead."""
    # (busy_timeout well under HANG: a store that waited on the loop fails
    # the send with a busy error after it, rather than hang the test.)
    async with actors.run_system(db_path, handler=noop, busy_timeout=3.0) as system:
        result: list[int] = []

        async def send() -> None:
            result.append(await system.send("s", "waited"))

        with WriteLock(db_path) as lock, trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(100):  # the loop runs (this task does) meanwhile
                    await trio.lowlevel.checkpoint()
                assert result == []  # still waiting for the lock
                lock.release()
        assert len(result) == 1
        with trio.fail_after(HANG):
            await system.drain()
        assert system.statistics().processed == 1


@pytest.mark.parametrize(("durability", "on_loop"), [("normal", True), ("full", False)])
async def test_the_commit_of_full_durability_runs_in_the_sync_thread(
    db_path: str, durability: str, on_loop: bool
) -> None:
    async with actors.run_system(db_path, handler=noop, durability=durability) as system:
        threads = threads_running(committer(system), "_commit")
        with trio.fail_after(HANG):
            for n in range(5):
                await system.send("s", n)
            await system.drain()
    assert threads
    assert (set(threads) == {threading.get_ident()}) is on_loop
    assert (threading.get_ident() in threads) is on_loop


async def send_pages(system: actors.System, messages: int) -> None:
    """Send ``messages`` bodies of about half a WAL page each, and process them."""
    body = "x" * 2000
    with trio.fail_after(60):
        for first in range(0, messages, 500):
            await system.send_many((f"s{i % 50}", body) for i in range(first, first + 500))
        await system.drain()


async def wal_size(db_path: str) -> int:
    wal = trio.Path(db_path + "-wal")
    return (await wal.stat()).st_size if await wal.exists() else 0


async def test_checkpoints_run_beside_the_commits_and_the_wal_starts_over(db_path: str) -> None:
    """Past CHECKPOINT_PAGES the bulk of a checkpoint runs in the checkpoint
    thread, then a short one between two transactions in a worker thread; the
    next commit starts the WAL over: it stays small however much is sent."""
    async with actors.run_system(db_path, handler=noop) as system:
        store = system._store
        threads = threads_running(store._tx, "_checkpoint")  # type: ignore[attr-defined]
        await send_pages(system, 6000)
        stats = store.statistics()
        assert stats.bulk_checkpoints >= 2, stats
        # Each bulk checkpoint is followed up by a short one at the next
        # transaction; the last may finish after the last commit, and then
        # waits for a commit that this test does not make (seen once in 4
        # full runs on a quiet machine: bulk 2, short 1).
        assert stats.checkpoints >= max(1, stats.bulk_checkpoints - 1), stats
        assert stats.wal_pages < sqlite_transactions.WAL_LIMIT_PAGES, stats
    assert threads and threading.get_ident() not in threads
    # Reused from the start: far smaller than the 6,000 x 2 KB written.
    assert await wal_size(db_path) < 8 * 1024 * 1024


async def test_the_wal_stays_bounded_when_the_checkpoint_thread_cannot_keep_up(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint thread never runs here: past WAL_LIMIT_PAGES the
    committer checkpoints everything itself, the commits held, and the WAL
    starts over all the same."""
    from actors.store.sqlite_checkpointer import Checkpointer

    monkeypatch.setattr(Checkpointer, "request", lambda self: None)
    limit = 2 * sqlite_transactions.CHECKPOINT_PAGES
    monkeypatch.setattr(sqlite_transactions, "WAL_LIMIT_PAGES", limit)
    async with actors.run_system(db_path, handler=noop) as system:
        store = system._store
        await send_pages(system, 8000)
        stats = store.statistics()
        assert stats.bulk_checkpoints == 0, stats
        assert stats.checkpoints >= 1, stats
        assert stats.wal_pages < limit + 500, stats
    assert await wal_size(db_path) < 16 * 1024 * 1024  # 8,000 x 2 KB went through it


# -- the router's batch is sealed as the committer takes its group --------


def gate_commits(store: committer_module.Committer) -> trio.Event:
    """Hold the committer inside its next group until the returned Event is set."""
    original = store._commit_group
    gate = trio.Event()

    async def gated(group: list[committer_module._Op]) -> None:
        await gate.wait()
        await original(group)

    store._commit_group = gated  # type: ignore[method-assign]
    return gate


def nothing() -> None:
    """An operation that writes nothing."""


async def test_sends_made_while_the_committer_is_busy_join_the_next_transaction(
    db_path: str,
) -> None:
    """The router's batch is sealed when the committer takes the group that
    writes it, not when the router submits it: a send made after the
    submission, while the committer is still busy with an earlier group,
    commits in the same batch and transaction as the first one. (Sealed at
    submission, as before, it waited for a transaction of its own.)"""
    async with actors.run_system(db_path, handler=noop) as system:
        store, router = committer(system), system._router
        with trio.fail_after(HANG):
            await system.drain()
            gate = gate_commits(store)
            ids: dict[str, int] = {}

            async def send(name: str) -> None:
                ids[name] = await system.send("s", name)

            async with trio.open_nursery() as nursery:
                try:
                    nursery.start_soon(store.call, nothing)  # the committer holds it
                    await trio.testing.wait_all_tasks_blocked()
                    batches, transactions = router.batches, store.statistics().transactions
                    nursery.start_soon(send, "a")
                    await trio.testing.wait_all_tasks_blocked()
                    assert store._sealing, "the router submitted its batch"
                    nursery.start_soon(send, "b")
                    await trio.testing.wait_all_tasks_blocked()
                finally:
                    gate.set()
            assert ids["b"] == ids["a"] + 1
            assert router.batches == batches + 1
            # One for the held group, one for both sends.
            assert store.statistics().transactions == transactions + 2
            await system.drain()
        assert system.statistics().processed == 2


async def test_a_sealed_operation_runs_after_everything_queued_before_its_seal(
    db_path: str,
) -> None:
    """The invariant that keeps a handed message from being claimed twice: an
    actor's claim queued before the batch is sealed (its reservation made)
    must run before the insert of the messages handed to it, or the claim
    would find them. So the sealed insert runs last in its group, even
    behind an operation queued after the router submitted it."""
    async with actors.run_system(db_path, handler=noop) as system:
        store = committer(system)
        ops = system._store._ops  # type: ignore[attr-defined]
        order: list[str] = []
        original_append = ops.append

        def append(*args: object) -> object:
            order.append("append")
            return original_append(*args)  # type: ignore[arg-type]

        def queued_later() -> None:
            order.append("queued later")

        ops.append = append
        with trio.fail_after(HANG):
            await system.drain()
            gate = gate_commits(store)
            async with trio.open_nursery() as nursery:
                try:
                    nursery.start_soon(store.call, nothing)  # the committer holds it
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(system.send, "s", "m")
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(store.call, queued_later)
                    await trio.testing.wait_all_tasks_blocked()
                finally:
                    gate.set()
            await system.drain()
        assert order == ["queued later", "append"]


async def test_a_seal_that_fails_fails_its_operation_not_the_committer(db_path: str) -> None:
    """seal() runs in the committer task, which must not raise: a bug there
    fails the operation (and with it the store, which stops the system)."""
    alive: list[bool] = []
    with pytest.raises(actors.StoreError, match="a bug in seal"):
        async with actors.run_system(db_path, handler=noop) as system:
            store = committer(system)

            def seal() -> tuple[()]:
                raise RuntimeError("a bug in seal()")

            with trio.fail_after(HANG):
                with pytest.raises(actors.StoreError, match="a bug in seal"):
                    await store.call_sealed(nothing, seal)
                # The committer ran the group and reported the error.
                alive.append(not store._done.is_set())
                await trio.sleep_forever()  # until the system stops on the failure
    assert alive == [True]
