"""Storage faults: failing writes, failing fsync and a full disk, injected by a VFS.

Every test runs on both store paths: ``inline`` (a MockClock, each operation
alone on the trio thread) and ``threaded`` (the real clock: the store's
committer, with worker threads and the sync thread of durability full).
A fault stays armed until ``run_system`` has exited, as a broken disk would,
then it is cleared and the tests check that:

- the operation that hit it failed with :class:`actors.StoreError` (a
  ``send()`` did not acknowledge its message), and the same error ended
  ``run_system`` (fail fast, see docs/guarantees.md, "Storage faults");
- ``PRAGMA integrity_check`` says ``ok``;
- a new ``run_system`` on the same file processes every acknowledged
  message, each once unless it was in flight when the fault hit; and no
  thread died of an unhandled exception on the way.

``FAULTS`` counts the faults injected, by kind; ``LOST`` counts acknowledged
messages that no handler ever finished (it must stay 0). Run with ``-s`` to
see both at the end of the module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apsw
import helpers
import pytest
import trio
import trio.testing
from deadprocess import mark_in_flight_started
from faultvfs import FaultVFS
from helpers import HANG, drain, find_cause

import actors

FAULTS: Counter[str] = Counter()  # by kind; the vfs fixture (conftest.py) adds to it
LOST: Counter[str] = Counter()


@dataclass(frozen=True)
class Fault:
    """A way for the disk to break, and what it leaves behind."""

    arm: Callable[[FaultVFS], None]
    # With a failed fsync the commit frame may already be in the WAL: SQLite
    # reports the error, but a later open can find the transaction committed.
    may_persist: bool = False
    durability: str = "normal"


FAULT_KINDS = {
    "io-error-wal": Fault(lambda vfs: vfs.fail_writes(target="wal")),
    "disk-full-wal-torn": Fault(lambda vfs: vfs.disk_full(target="wal", torn=True)),
    "fsync-wal": Fault(
        lambda vfs: vfs.fail_syncs(target="wal"), may_persist=True, durability="full"
    ),
}
FAULT_PARAMS = [pytest.param(fault, id=name) for name, fault in FAULT_KINDS.items()]


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    lost = sum(LOST.values())
    print(f"\nstorage faults injected: {dict(FAULTS)}; acknowledged messages lost: {lost}")


@dataclass
class Ledger:
    """What was acknowledged and what was handled, across runs of a system."""

    acked: dict[int, Any] = field(default_factory=dict)  # id -> body
    handled: list[tuple[int, Any, int]] = field(default_factory=list)  # (id, body, attempt)
    # body -> coroutine run before the handler returns (may block, arm, raise)
    hooks: dict[Any, Callable[[actors.Message], Awaitable[None]]] = field(default_factory=dict)

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> None:
        hook = self.hooks.get(msg.body)
        if hook is not None:
            await hook(msg)
        self.handled.append((msg.id, msg.body, msg.attempt))

    async def send(self, system: actors.System, session: str, body: Any) -> int:
        message_id = await system.send(session, body)
        self.acked[message_id] = body
        return message_id

    def times_handled(self) -> Counter[int]:
        return Counter(i for i, _, _ in self.handled)


async def until_the_system_fails() -> None:
    """Wait to be cancelled by the failing system (fail, not hang, if it goes on)."""
    with trio.fail_after(HANG):
        await trio.sleep_forever()


def integrity(path: str) -> str:
    conn = apsw.Connection(path)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def rows(path: str, sql: str = "SELECT id, state, attempts FROM messages ORDER BY id") -> list[Any]:
    return helpers.rows(path, sql)


def injected_cause(exc: BaseException) -> BaseException | None:
    """The exception the VFS raised, somewhere in ``exc``'s chain of causes."""
    return find_cause(exc, apsw.Error, lambda e: "faultvfs" in str(e))


async def recover(path: str, ledger: Ledger, vfs: FaultVFS, fault_name: str) -> None:
    """Clear the fault, check the file, and process everything in a new system."""
    vfs.clear()
    assert integrity(path) == "ok"
    ledger.hooks.clear()
    async with actors.run_system(path, handler=ledger.handler) as system:
        await drain(system)
        assert system.dead_letters() == []
    lost = set(ledger.acked) - {i for i, _, _ in ledger.handled}
    LOST[fault_name] += len(lost)
    assert not lost, f"acknowledged but never handled: {sorted(lost)}"
    assert rows(path) == []
    assert integrity(path) == "ok"


def check_run_error(exc: BaseException, vfs: FaultVFS) -> None:
    """run_system ended with a StoreError caused by the injected fault."""
    assert isinstance(exc, actors.StoreError), f"expected StoreError, got {exc!r}"
    assert injected_cause(exc) is not None, f"the injected fault is not the cause: {exc!r}"
    assert vfs.total_injected >= 1


class Stop(Exception):
    """Raised in a test's ``async with`` body to stop a system at once."""


FAST = {
    "retry_backoff": actors.Backoff(initial=0.001, jitter=0.0),
    "restart_policy": actors.RestartPolicy(backoff=actors.Backoff(initial=0.001, jitter=0.0)),
}


# -- a fault in send(): the router's append ------------------------------------


@pytest.mark.parametrize("api", ["send", "send_many"])
@pytest.mark.parametrize(
    "fault",
    [
        *FAULT_PARAMS,
        # Transient: only the next write fails. The system still stops.
        pytest.param(Fault(lambda vfs: vfs.disk_full(count=1)), id="disk-full-once"),
    ],
)
async def test_fault_in_send(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    fault: Fault,
    api: str,
    request: pytest.FixtureRequest,
) -> None:
    ledger = Ledger()
    holding = trio.Event()

    async def hold(msg: actors.Message) -> None:
        holding.set()
        await trio.sleep_forever()  # in flight when the store fails

    ledger.hooks["slow-0"] = hold
    unacked = ["unacked"] if api == "send" else ["unacked-0", "unacked-1"]
    with pytest.raises(actors.StoreError) as run_error:
        async with actors.run_system(
            db_path, handler=ledger.handler, durability=fault.durability, **FAST
        ) as system:
            for i in range(3):
                await ledger.send(system, "fast", f"fast-{i}")
            await drain(system)
            for i in range(3):
                await ledger.send(system, "slow", f"slow-{i}")
            await holding.wait()  # quiet now: slow-0 in flight, slow-1 and slow-2 pending
            fault.arm(vfs)
            with pytest.raises(actors.StoreError, match="faultvfs: injected") as send_error:
                if api == "send":
                    await system.send("fast", unacked[0])
                else:
                    await system.send_many([("fast", b) for b in unacked])
            assert injected_cause(send_error.value) is not None
            await until_the_system_fails()
    check_run_error(run_error.value, vfs)
    assert not thread_errors
    states = [s for (s,) in rows(db_path, "SELECT state FROM messages ORDER BY id")]
    # slow-0 in flight (recovered at the next start); slow-1 and slow-2 pending,
    # or claimed on delivery behind it (given back at the next start: never ran)
    assert states[0] == 1 and set(states[1:3]) <= {0, 1}
    assert states[3:] == [] or (fault.may_persist and states[3:] == [0] * len(unacked))
    await recover(db_path, ledger, vfs, request.node.callspec.id)
    # Every acknowledged message exactly once: slow-0's handler never returned.
    assert set(ledger.times_handled().values()) == {1}
    handled_unacked = [b for _, b, _ in ledger.handled if b in unacked]
    assert handled_unacked == [] or (fault.may_persist and handled_unacked == unacked)
    attempts = {b: a for _, b, a in ledger.handled}
    assert attempts["slow-0"] == 2  # redelivered, and it says so
    assert all(a == 1 for b, a in attempts.items() if b != "slow-0")


# -- a fault in a claim ---------------------------------------------------------


async def leave_work_behind(db_path: str, ledger: Ledger) -> None:
    """Sessions a, b, c: message 0 of each in flight when the system stops at once,
    message 1 pending. Afterwards no message is in flight in the database."""
    started = {s: trio.Event() for s in "abc"}

    async def hold(msg: actors.Message) -> None:
        started[msg.session_id].set()
        await trio.sleep_forever()

    for s in "abc":
        ledger.hooks[f"{s}-0"] = hold
    with pytest.raises(Stop):
        async with actors.run_system(db_path, handler=ledger.handler, **FAST) as system:
            for i in range(2):
                for s in "abc":
                    await ledger.send(system, s, f"{s}-{i}")
            for event in started.values():
                await event.wait()
            raise Stop
    ledger.hooks.clear()
    # state pending everywhere; the started handlers' attempts stay counted
    assert rows(db_path) == [(i, 0, 1) for i in sorted(ledger.acked)[:3]] + [
        (i, 0, 0) for i in sorted(ledger.acked)[3:]
    ]


@pytest.mark.parametrize("fault", FAULT_PARAMS)
async def test_fault_in_claim(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    fault: Fault,
    request: pytest.FixtureRequest,
) -> None:
    ledger = Ledger()
    await leave_work_behind(db_path, ledger)
    before = rows(db_path)
    # Opening writes nothing here (no message in flight to recover), so the
    # first write of the next system is a claim.
    fault.arm(vfs)
    body_ran = False
    with pytest.raises(actors.StoreError) as run_error:
        async with actors.run_system(
            db_path, handler=ledger.handler, durability=fault.durability, **FAST
        ) as system:
            body_ran = True
            await drain(system)
    assert body_ran  # the store failed after it opened
    check_run_error(run_error.value, vfs)
    assert not thread_errors
    assert ledger.handled == []  # no claim committed, so no handler ran
    if not fault.may_persist:
        assert rows(db_path) == before  # and no attempt was counted
    await recover(db_path, ledger, vfs, request.node.callspec.id)
    assert set(ledger.times_handled().values()) == {1}
    attempts = {b: a for _, b, a in ledger.handled}
    for s in "abc":
        # A claim that failed did not count an attempt; after a failed fsync
        # it may have been committed after all (then recovery counts it).
        assert attempts[f"{s}-0"] in ((2, 3) if fault.may_persist else (2,))
        assert attempts[f"{s}-1"] in ((1, 2) if fault.may_persist else (1,))


# -- a fault in an ack, or in recording a failed attempt -----------------------


class Boom(Exception):
    pass


@pytest.mark.parametrize("outcome", ["ack", "failed-attempt"])
@pytest.mark.parametrize("fault", FAULT_PARAMS)
async def test_fault_in_ack_or_failure_record(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    fault: Fault,
    outcome: str,
    request: pytest.FixtureRequest,
) -> None:
    """The handler of m-2 arms the fault, then returns (its ack fails) or raises
    (the record of its failed attempt fails)."""
    ledger = Ledger()

    async def arm(msg: actors.Message) -> None:
        fault.arm(vfs)
        if outcome == "failed-attempt":
            raise Boom("the handler failed; recording that fails too")

    ledger.hooks["m-2"] = arm
    bodies = [f"m-{i}" for i in range(5)]
    with pytest.raises(actors.StoreError) as run_error:
        async with actors.run_system(
            db_path, handler=ledger.handler, durability=fault.durability, **FAST
        ) as system:
            ids = await system.send_many([("s", b) for b in bodies])
            ledger.acked.update(zip(ids, bodies, strict=True))
            await drain(system)
    check_run_error(run_error.value, vfs)
    assert not thread_errors
    first_run = [b for _, b, _ in ledger.handled]
    if outcome == "ack":
        # Acks are not waited for: the messages claimed with m-2 may have run
        # before its failure stopped the system (in order, never beyond).
        assert first_run[:3] == ["m-0", "m-1", "m-2"] and first_run == bodies[: len(first_run)]
    else:
        assert first_run == ["m-0", "m-1"]  # m-3 waits behind the failed m-2
    await recover(db_path, ledger, vfs, request.node.callspec.id)
    seen = [(b, a) for _, b, a in ledger.handled]
    # Nothing lost; each message's deliveries say attempt 1, 2, ... in turn.
    assert {b for b, _ in seen} == set(bodies)
    for body in bodies:
        attempts = [a for b, a in seen if b == body]
        # (m-2's failed first attempt raised before the ledger saw it.)
        first = 2 if body == "m-2" and outcome == "failed-attempt" else 1
        assert attempts == list(range(first, first + len(attempts))), (body, seen)
    # The recovery run handled its messages in send order.
    second_run = [b for b, _ in seen[len(first_run) :]]
    assert second_run == sorted(second_run), seen
    # m-2 ran and its outcome (the ack, or the failure's record) was lost with
    # the store: it runs again, and says so (unless a failed fsync persisted
    # the ack after all).
    assert ("m-2", 2) in seen or (fault.may_persist and outcome == "ack"), seen
    # A message that ran after m-2 in the first run also runs again, honestly.
    for body in first_run[3:]:
        assert (body, 2) in seen or fault.may_persist, seen


# -- faults while the database is created or recovered ------------------------


@pytest.mark.parametrize(
    "arm",
    [
        pytest.param(lambda vfs: vfs.fail_writes(), id="io-error"),
        pytest.param(lambda vfs: vfs.disk_full(torn=True), id="disk-full-torn"),
        pytest.param(lambda vfs: vfs.fail_writes(target="main"), id="io-error-main"),
    ],
)
async def test_fault_while_creating_the_database(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    arm: Callable[[FaultVFS], None],
) -> None:
    arm(vfs)
    with pytest.raises(actors.StoreError, match="cannot open database") as error:
        async with actors.run_system(db_path, handler=Ledger().handler):
            pytest.fail("the system started on a database it could not create")
    assert injected_cause(error.value) is not None
    assert not thread_errors
    vfs.clear()
    assert integrity(db_path) == "ok"
    ledger = Ledger()
    async with actors.run_system(db_path, handler=ledger.handler) as system:
        await ledger.send(system, "s", "after")
        await drain(system)
    assert [b for _, b, _ in ledger.handled] == ["after"]


@pytest.mark.parametrize("fault", FAULT_PARAMS)
async def test_fault_during_startup_recovery(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    fault: Fault,
    request: pytest.FixtureRequest,
) -> None:
    """A dead process left messages in flight; the fault hits their recovery."""
    ledger = Ledger()
    await leave_work_behind(db_path, ledger)
    conn = apsw.Connection(db_path)
    conn.execute("UPDATE messages SET state = 1 WHERE attempts = 1")  # as after SIGKILL
    conn.close()
    mark_in_flight_started(db_path)  # their handlers had started
    fault.arm(vfs)
    with pytest.raises(actors.StoreError, match="cannot open database") as error:
        async with actors.run_system(db_path, handler=ledger.handler, durability=fault.durability):
            pytest.fail("the system started although its recovery failed")
    assert injected_cause(error.value) is not None
    assert not thread_errors
    assert ledger.handled == []
    await recover(db_path, ledger, vfs, request.node.callspec.id)
    attempts = {b: a for _, b, a in ledger.handled}
    assert [attempts[f"{s}-0"] for s in "abc"] == [2, 2, 2]


# -- checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize(
    "arm",
    [
        pytest.param(lambda vfs: vfs.fail_writes(target="main"), id="io-error-main"),
        pytest.param(lambda vfs: vfs.disk_full(target="main", torn=True), id="disk-full-main"),
        pytest.param(lambda vfs: vfs.fail_syncs(target="main"), id="fsync-main"),
    ],
)
async def test_fault_in_the_checkpoint_at_close(
    db_path: str,
    store_clock: object,
    vfs: FaultVFS,
    thread_errors: list[BaseException],
    arm: Callable[[FaultVFS], None],
) -> None:
    """Closing the database checkpoints the WAL into the main file; that fails.

    SQLite keeps the WAL and finishes the checkpoint at the next open, so the
    work is safe. apsw raises the VFS's exception from ``close()`` (see
    faultvfs), so this is where the store's handling of a failing close
    shows: it may end ``run_system`` with a StoreError, or let it end
    normally, but nothing else may escape, not even from a worker thread.
    """
    ledger = Ledger()
    closed_with: BaseException | None = None
    try:
        async with actors.run_system(db_path, handler=ledger.handler) as system:
            for i in range(3):
                await ledger.send(system, "s", f"done-{i}")
            await drain(system)
            for i in range(3):
                ledger.acked[await system.send("t", f"later-{i}", delay=3600)] = f"later-{i}"
            arm(vfs)
    except actors.StoreError as exc:
        closed_with = exc
    assert vfs.total_injected >= 1  # the checkpoint at close was tried, and failed
    if closed_with is not None:
        assert injected_cause(closed_with) is not None
    assert not thread_errors, thread_errors
    vfs.clear()
    assert integrity(db_path) == "ok"
    # The delayed messages are still there, pending, for the next start.
    async with actors.run_system(db_path, handler=ledger.handler) as system:
        assert system.statistics().pending == 3
    assert [b for (b,) in rows(db_path, "SELECT body FROM messages ORDER BY id")] == [
        f'"later-{i}"' for i in range(3)
    ]
