"""The store fails in ways a transaction meets at its BEGIN, or the committer breaks.

Invariant 8: a store failure comes out of ``async with run_system(...)`` as
:class:`actors.StoreError`, every time, and every task waiting for the store
is woken with StoreError; nothing hangs. Each case runs on both of the
store's paths: ``inline`` (a MockClock: each operation alone, on the trio
thread) and ``threaded`` (the real clock: the committer's group
transactions, worker threads).

The faults (tests/faultvfs.py) hit the group's ``BEGIN IMMEDIATE``: a read
of page 1 that fails (I/O error, out of memory, corruption) or returns
garbage, and a WAL index that cannot be mapped. A warm connection reads
nothing at BEGIN while nobody else writes, so each test has another
connection write first (as ``actors retry`` or an operator's ``sqlite3``
shell does), or another process grow the WAL past the index's first
region. ``trio.fail_after`` is only a hang detector here.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import apsw
import pytest
import trio
import trio.testing
from faultvfs import FaultVFS
from helpers import HANG, drain, find_cause
from test_storage_faults import Ledger, integrity, rows, until_the_system_fails

import actors
from actors.store import sqlite_transactions
from actors.store.sqlite import SqliteStore

FAULTS: Counter[str] = Counter()  # faults injected, by kind (the vfs fixture adds; printed with -s)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nstore faults injected: {dict(FAULTS)}")


def write_elsewhere(path: str) -> None:
    """Commit a change through another connection: the store's next BEGIN must read."""
    conn = apsw.Connection(path)
    conn.set_busy_timeout(10_000)
    try:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('elsewhere', random())")
    finally:
        conn.close()


def grow_wal_elsewhere(path: str) -> None:
    """Another process commits 4,200 pages without checkpointing: the WAL index
    grows past its first region, which the store's connection has not mapped."""
    script = (
        "import apsw, sys\n"
        "conn = apsw.Connection(sys.argv[1])\n"
        "conn.set_busy_timeout(10_000)\n"
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        'conn.execute("INSERT OR REPLACE INTO meta (key, value)'
        " VALUES ('filler', zeroblob(4200 * 4096))\")\n"
        "conn.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, path], check=True, timeout=60)


BeginFault = tuple[Callable[[str], None], Callable[[FaultVFS], None], str]

BEGIN_FAULTS: dict[str, BeginFault] = {
    "read-io-error": (write_elsewhere, lambda vfs: vfs.fail_reads(kind="read"), "read"),
    "read-out-of-memory": (write_elsewhere, lambda vfs: vfs.fail_reads(kind="nomem"), "nomem"),
    "read-corrupt": (write_elsewhere, lambda vfs: vfs.fail_reads(kind="corrupt"), "corrupt"),
    "read-garbled": (write_elsewhere, lambda vfs: vfs.fail_reads(kind="garble"), "garble"),
    "shm-map": (grow_wal_elsewhere, lambda vfs: vfs.fail_shm_maps(), "shmmap"),
}


def apsw_cause(exc: BaseException) -> apsw.Error | None:
    """The apsw error somewhere in ``exc``'s chain of causes."""
    return find_cause(exc, apsw.Error)


@pytest.mark.parametrize("durability", ["normal", "full"])
@pytest.mark.parametrize("fault", list(BEGIN_FAULTS), ids=list(BEGIN_FAULTS))
async def test_a_fault_at_begin_surfaces(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    fault: str,
    durability: str,
) -> None:
    """The send whose transaction cannot begin fails; the system stops with StoreError."""
    prepare, arm, kind = BEGIN_FAULTS[fault]
    ledger = Ledger()
    send_outcome: list[object] = []
    with pytest.raises(actors.StoreError) as run_error:
        async with actors.run_system(
            db_path, handler=ledger.handler, durability=durability
        ) as system:
            for i in range(3):
                await ledger.send(system, "s", f"before-{i}")
            await drain(system)
            prepare(db_path)  # (blocking the loop: the store is idle)
            arm(vfs)
            try:
                with trio.fail_after(HANG):  # a hang detector only
                    try:
                        send_outcome.append(await system.send("s", "after"))
                    except actors.StoreError as exc:
                        send_outcome.append(exc)
            finally:
                if kind == "garble":
                    # The checkpoint at close would copy the garbled page 1
                    # from the WAL into the database file (as it would from a
                    # disk that returns garbage), and the next start would
                    # find no database: the disk is good again from here.
                    vfs.clear()
            await until_the_system_fails()
    # The send was not acknowledged: it failed (or the failing system
    # cancelled it first, when another operation met the fault before it).
    assert all(isinstance(o, actors.StoreError) for o in send_outcome), send_outcome
    cause = apsw_cause(run_error.value)
    assert cause is not None, run_error.value
    assert vfs.injected[kind] >= 1
    if kind == "shmmap":
        assert getattr(cause, "extendedresult", None) == apsw.SQLITE_IOERR_SHMMAP
    assert not thread_errors, thread_errors
    vfs.clear()
    assert integrity(db_path) == "ok"
    # Nothing acknowledged is lost: a new system runs what was left (nothing
    # here: the three were processed, the failed send was not acknowledged).
    async with actors.run_system(db_path, handler=ledger.handler) as system:
        await drain(system)
        ledger.acked[await system.send("s", "later")] = "later"
        await drain(system)
    assert {b for _, b, _ in ledger.handled} == set(ledger.acked.values())
    assert rows(db_path) == []


# -- the committer's own failures -------------------------------------------


class CallbackBug(Exception):
    """A completion callback that raises (a bug in the runtime)."""


async def test_a_completion_callback_that_raises(db_path: str, store_clock: object) -> None:
    """``done=`` raises inside the committer: the system stops with StoreError,
    and the other operations of its group are still reported."""
    ledger = Ledger()
    results: dict[str, object] = {}
    with pytest.raises(actors.StoreError, match="completion of a committed operation") as error:
        async with actors.run_system(db_path, handler=ledger.handler) as system:
            store = system._store
            committer = store._committer  # type: ignore[attr-defined]

            def bug(_: object) -> None:
                raise CallbackBug("from a completion callback")

            async def call(name: str) -> None:
                try:
                    results[name] = await committer.call(store._ops.nothing)  # type: ignore[attr-defined]
                except actors.StoreError as exc:
                    results[name] = exc

            with trio.fail_after(HANG):  # a hang detector only
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call, "before")
                    await trio.testing.wait_all_tasks_blocked()
                    committer.submit(store._ops.nothing, done=bug)  # type: ignore[attr-defined]
                    nursery.start_soon(call, "after")
            await until_the_system_fails()
    assert isinstance(error.value.__cause__, actors.StoreError)
    assert isinstance(error.value.__cause__.__cause__, CallbackBug)
    # Both callers were woken: the one queued before the bug with its result
    # (committed, in an earlier group or earlier in the same one); the one
    # after it with its result too (same group) or with StoreError (later).
    assert results["before"] is None
    assert results["after"] is None or isinstance(results["after"], actors.StoreError)


async def test_an_ack_callback_that_raises(
    db_path: str, store_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real completion callback of the runtime (the one of ``ack_soon``) raises."""
    original = SqliteStore.ack_soon

    def ack_soon(self: SqliteStore, ack: object, done: Callable[[Any], None]) -> None:
        def failing(result: Any) -> None:
            raise CallbackBug("the ack's completion failed")

        original(self, ack, failing)  # type: ignore[arg-type]

    monkeypatch.setattr(SqliteStore, "ack_soon", ack_soon)
    ledger = Ledger()
    with pytest.raises(actors.StoreError) as error:
        async with actors.run_system(db_path, handler=ledger.handler) as system:
            # One call: a later send could meet the system already stopping
            # (SystemClosedError beside the StoreError: issue 16, item 8).
            bodies = [f"m-{i}" for i in range(3)]
            ids = await system.send_many([("s", b) for b in bodies])
            ledger.acked.update(zip(ids, bodies, strict=True))
            await until_the_system_fails()
    assert isinstance(error.value.__cause__, actors.StoreError)
    assert isinstance(error.value.__cause__.__cause__, CallbackBug)
    monkeypatch.undo()
    async with actors.run_system(db_path, handler=ledger.handler) as system:
        await drain(system)
    assert set(ledger.acked.values()) <= {b for _, b, _ in ledger.handled}


@pytest.mark.parametrize("where", ["take", "complete", "checkpoint"])
async def test_anything_that_escapes_the_committer(
    db_path: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Whatever escapes the committer task (real clock: its threaded path)
    wakes every waiting operation with StoreError and stops the system."""
    ledger = Ledger()

    class Broken(Exception):
        pass

    def broken(*args: object) -> Any:
        raise Broken(f"the committer broke at {where}")

    outcomes: list[object] = []
    with pytest.raises(actors.StoreError, match="committer failed") as error:
        async with actors.run_system(db_path, handler=ledger.handler) as system:
            await ledger.send(system, "s", "before")
            await drain(system)
            store = system._store
            committer = store._committer  # type: ignore[attr-defined]
            if where == "take":
                monkeypatch.setattr(committer, "_take_group", broken)
            elif where == "complete":
                monkeypatch.setattr(committer, "_complete", broken)
            else:
                monkeypatch.setattr(sqlite_transactions, "CHECKPOINT_PAGES", 0)
                monkeypatch.setattr(store._tx, "maintain", broken)  # type: ignore[attr-defined]

            async def send(body: str) -> None:
                try:
                    outcomes.append(await system.send("s", body))
                except actors.StoreError as exc:
                    outcomes.append(exc)

            with trio.fail_after(HANG):  # a hang detector only
                async with trio.open_nursery() as nursery:
                    for i in range(3):
                        nursery.start_soon(send, f"m-{i}")
            await until_the_system_fails()
    assert isinstance(error.value.__cause__, actors.StoreError)
    assert isinstance(error.value.__cause__.__cause__, Broken)
    # Each send returned, failed, or was cancelled by the stopping system;
    # none was acknowledged unless its group committed before the break.
    if where != "checkpoint":
        assert all(isinstance(o, actors.StoreError) for o in outcomes), outcomes
    monkeypatch.undo()
    async with actors.run_system(db_path, handler=ledger.handler) as system:
        await drain(system)
    assert rows(db_path) == []


async def test_a_lock_error_on_the_reader(
    db_path: str, store_clock: object, vfs: FaultVFS, thread_errors: list[BaseException]
) -> None:
    """``dead_letters()`` reads through a connection of its own, opened at its
    first call: a lock error there fails that call, not the system. (The
    store's connection keeps its lock on the file in WAL mode: its BEGIN
    takes no lock of the file, so a lock fault cannot reach it.)"""
    ledger = Ledger()
    async with actors.run_system(db_path, handler=ledger.handler) as system:
        await ledger.send(system, "s", "before")
        await drain(system)
        vfs.fail_locks(target="main")
        with pytest.raises(actors.StoreError, match="cannot read dead letters"):
            system.dead_letters()
        assert vfs.injected["lock"] >= 1
        vfs.clear()
        assert system.dead_letters() == []
        await ledger.send(system, "s", "after")
        await drain(system)
    assert [b for _, b, _ in ledger.handled] == ["before", "after"]
    assert not thread_errors
