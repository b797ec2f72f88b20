"""Whole-process crashes: SIGKILL mid-stream, a message that kills its process, the lock.

The system under test runs in child processes (tests/crash_child.py) on the
real clock; these tests are synchronous and poll the child's log file with
short sleeps and a deadline. Every child runs with a timeout and is killed
(by its own pid) if a test fails while it runs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
from progress import ProgressPipe

import actors

CHILD = Path(__file__).with_name("crash_child.py")
INDEX_BASE = 1_000_000  # crash_child.INDEX_BASE: a stream run's indices start at run * this
CHILD_TIMEOUT = 30.0  # seconds any child may take to finish (or to get ready)


# -- running children -----------------------------------------------------


class Child:
    """A running crash_child.py process."""

    def __init__(self, tmp_path: Path, mode: str, db: Path, log: Path, *options: str) -> None:
        self.stderr_path = tmp_path / f"child-{mode}-{time.monotonic_ns()}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.progress = ProgressPipe()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), mode, str(db), str(log), *options],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            **self.progress.popen_options(),
        )
        self.progress.spawned()
        self.pid = self.proc.pid

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        """Check ``predicate`` each time the child logs; fail if it exits or time runs out."""

        def fail(why: str) -> None:
            pytest.fail(f"{why} before {what}:\n{self.stderr()}")

        self.progress.wait(self.proc, predicate, timeout, fail)

    def finish(self, timeout: float = CHILD_TIMEOUT) -> tuple[int, str]:
        """Wait for the child to exit by itself; returns (exit code, stdout)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"child did not finish within {timeout}s:\n{self.stderr()}")
        return self.proc.returncode, out

    def sigkill(self) -> None:
        assert self.proc.poll() is None, "child had already exited"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=CHILD_TIMEOUT)
        assert self.proc.returncode == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=CHILD_TIMEOUT)
        self._stderr.close()
        self.progress.close()


@contextlib.contextmanager
def child(tmp_path: Path, mode: str, db: Path, log: Path, *options: str) -> Iterator[Child]:
    c = Child(tmp_path, mode, db, log, *options)
    try:
        yield c
    finally:
        c.close()


def run_child(tmp_path: Path, mode: str, db: Path, log: Path, *options: str) -> tuple[int, str]:
    with child(tmp_path, mode, db, log, *options) as c:
        return c.finish()


# -- reading the log ------------------------------------------------------


class Entry:
    """One log line, with the run of the child that wrote it."""

    __slots__ = ("attempt", "id", "index", "kind", "run", "session")

    def __init__(self, run: int, fields: list[str]) -> None:
        self.run = run
        self.kind = fields[0]
        self.id = int(fields[1]) if self.kind in ("acked", "processed", "poison") else 0
        self.session = fields[2] if self.id else ""
        self.index = int(fields[3]) if self.id else 0
        self.attempt = int(fields[4]) if self.kind in ("processed", "poison") else 0


def read_log(log: Path, *, child_running: bool = False) -> list[Entry]:
    if not log.exists():
        return []
    text = log.read_text()
    if child_running:
        # Read while the child appends: a line that crosses a page boundary
        # can be seen half written. Leave it for the next look.
        text = text[: text.rfind("\n") + 1]
    # Each line is one write(): a kill never leaves half of one.
    assert text == "" or text.endswith("\n"), text[-200:]
    entries: list[Entry] = []
    run = -1
    for line in text.splitlines():
        fields = line.split()
        if fields[0] == "run":
            run = int(fields[1])
        entries.append(Entry(run, fields))
    return entries


def count(log: Path, kind: str, run: int, *, child_running: bool = False) -> int:
    entries = read_log(log, child_running=child_running)
    return sum(1 for e in entries if e.kind == kind and e.run == run)


def integrity_check(db: Path) -> None:
    conn = apsw.Connection(str(db))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


# -- a. SIGKILL mid-stream --------------------------------------------------

SESSIONS = 4
PER_SESSION = 400  # sends per session per stream run: far more than a run gets to
STREAM_OPTIONS = (
    f"--sessions={SESSIONS}",
    f"--per-session={PER_SESSION}",
    "--send-gap=0.002",
    # The handler logs "processed" after 1 ms and returns 4 ms later: a kill
    # often lands while a processed message is not yet acknowledged.
    "--before=0.001",
    "--after=0.004",
)
KILLS = 3


def test_sigkill_mid_stream_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "actors.db"
    log = tmp_path / "log.txt"
    run = 0
    killed_runs: set[int] = set()
    drains: list[dict[str, Any]] = []
    for _ in range(KILLS):
        run += 1
        with child(tmp_path, "stream", db, log, f"--run={run}", *STREAM_OPTIONS) as c:

            def progressed(run: int = run) -> bool:
                return (
                    count(log, "acked", run, child_running=True) >= 150
                    and count(log, "processed", run, child_running=True) >= 40
                )

            c.wait_until("acks and processed messages", progressed, timeout=CHILD_TIMEOUT)
            c.sigkill()
        killed_runs.add(run)
        # Killed mid-stream: its senders had not finished.
        assert count(log, "acked", run) < SESSIONS * PER_SESSION
        run += 1
        code, out = run_child(tmp_path, "drain", db, log, f"--run={run}")
        assert code == 0, out
        drains.append(json.loads(out))
    run += 1
    code, out = run_child(tmp_path, "drain", db, log, f"--run={run}")
    assert code == 0, out
    final = json.loads(out)

    for stats in [*drains, final]:
        assert stats["pending"] == 0 and stats["in_flight"] == 0 and stats["dead"] == 0, stats
    # Every kill left work behind, and in-flight messages were recovered at once.
    assert all(stats["processed"] > 0 for stats in drains), drains
    assert sum(stats["recovered"] for stats in drains) > 0, drains
    # The drains after the kills did everything; the final one finds nothing.
    assert final["recovered"] == 0 and final["processed"] == 0, final

    entries = read_log(log)
    where: dict[int, tuple[str, int]] = {}
    acked: set[int] = set()
    processed: list[Entry] = []
    for e in entries:
        if e.kind in ("acked", "processed"):
            assert where.setdefault(e.id, (e.session, e.index)) == (e.session, e.index), e.id
            assert e.index // INDEX_BASE in killed_runs  # only stream runs sent
        if e.kind == "acked":
            acked.add(e.id)
        elif e.kind == "processed":
            processed.append(e)
    assert len(acked) >= KILLS * 150

    # 1. Every acknowledged message was processed (by some process).
    done = {e.id for e in processed}
    missing = sorted(acked - done)
    assert not missing, f"{len(missing)} acked messages never processed: {missing[:10]}"

    # 2. Per-session order of first processing is index order, without gaps:
    # a session's sends were sequential, so whatever committed is a prefix.
    first: dict[str, list[int]] = defaultdict(list)
    seen: set[int] = set()
    for e in processed:
        if e.id not in seen:
            seen.add(e.id)
            first[e.session].append(e.index)
    assert sorted(first) == [f"s{i}" for i in range(SESSIONS)]
    for session, indices in first.items():
        assert indices == sorted(indices), session
        for r in killed_runs:
            of_run = [i - r * INDEX_BASE for i in indices if i // INDEX_BASE == r]
            assert of_run == list(range(len(of_run))), (session, r)

    # 4. Duplicates only for a message in flight at a kill: the last message
    # its session processed in a killed run (so at most one per session per
    # kill), redelivered with a higher attempt.
    last_in_run: dict[tuple[int, str], int] = {}
    occurrences: dict[int, list[Entry]] = defaultdict(list)
    for e in processed:
        last_in_run[e.run, e.session] = e.id
        occurrences[e.id].append(e)
    duplicates: dict[str, int] = defaultdict(int)
    for message_id, occ in occurrences.items():
        if len(occ) == 1:
            continue
        duplicates[occ[0].session] += len(occ) - 1
        for earlier in occ[:-1]:
            assert earlier.run in killed_runs, (message_id, earlier.run)
            assert last_in_run[earlier.run, earlier.session] == message_id, message_id
        attempts = [e.attempt for e in occ]
        assert attempts == sorted(set(attempts)) and attempts[1] > 1, (message_id, attempts)
        assert len({e.run for e in occ}) == len(occ), message_id  # never twice in one run
    for session, n in duplicates.items():
        assert n <= KILLS, (session, n)

    integrity_check(db)


# -- b. a message that kills the process ----------------------------------

MAX_ATTEMPTS = 3


def test_process_killing_message_ends_in_dead_letters(tmp_path: Path) -> None:
    db = tmp_path / "actors.db"
    log = tmp_path / "log.txt"
    codes: list[int] = []
    final: dict[str, Any] = {}
    for run in range(1, MAX_ATTEMPTS + 2):
        options = [f"--run={run}", f"--max-attempts={MAX_ATTEMPTS}"]
        if run == 1:
            options.append("--seed")
        code, out = run_child(tmp_path, "poison", db, log, *options)
        codes.append(code)
        if code == 0:
            final = json.loads(out)
            break
    # Each run dies on the poison message, until its attempts are used up:
    # then it is dead-lettered and the run drains the rest.
    assert codes == [1] * MAX_ATTEMPTS + [0], codes
    assert final["pending"] == 0 and final["in_flight"] == 0, final

    entries = read_log(log)
    acked = {(e.session, e.index): e.id for e in entries if e.kind == "acked"}
    assert len(acked) == 14
    poison_id = acked["p", 1]
    poison = [(e.run, e.id, e.attempt) for e in entries if e.kind == "poison"]
    assert poison == [(run, poison_id, run) for run in range(1, MAX_ATTEMPTS + 1)]
    processed = [e for e in entries if e.kind == "processed"]
    assert {(e.session, e.index) for e in processed} == set(acked) - {("p", 1)}
    # The session's later messages waited behind the poison, then ran in order.
    # (p-0 may run again in run 2: handled in run 1, its ack may not have
    # committed yet when p-1, claimed with it, killed the process.)
    p_order = [(e.index, e.run) for e in processed if e.session == "p"]
    assert p_order in (
        [(0, 1), (2, MAX_ATTEMPTS + 1), (3, MAX_ATTEMPTS + 1)],
        [(0, 1), (0, 2), (2, MAX_ATTEMPTS + 1), (3, MAX_ATTEMPTS + 1)],
    ), p_order

    # Read the dead letters through a run of the system.
    handled: list[actors.Message] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append(msg)

    async def inspect() -> tuple[list[actors.DeadLetter], actors.SystemStatistics]:
        async with actors.run_system(db, handler=handler, max_attempts=MAX_ATTEMPTS) as system:
            await system.drain()
            return system.dead_letters(), system.statistics()

    dead, stats = trio.run(inspect)
    assert handled == []
    # Only the message that killed the process is dead. Messages of other
    # sessions that were claimed (or even processed, their ack not yet
    # committed) when the process died must not be charged into dead
    # letters along with it.
    assert [(d.id, d.session_id, d.body, d.attempts) for d in dead] == [
        (poison_id, "p", ["p", 1, "poison"], MAX_ATTEMPTS)
    ], [(d.id, d.session_id, d.body, d.attempts, d.last_error[:60]) for d in dead]
    assert dead[0].last_error  # says why
    assert stats.dead == 1 and stats.pending == 0
    assert final["dead"] == 1, final
    integrity_check(db)


# -- c. one system per database, across processes ----------------------------


def test_database_lock_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "actors.db"
    log = tmp_path / "log.txt"
    handled: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append(msg.body)

    async def open_and_send() -> None:
        async with actors.run_system(db, handler=handler) as system:
            await system.send("s", "after the child died")
            await system.drain()

    with child(tmp_path, "hold", db, log, "--run=1") as c:
        c.wait_until(
            "the child to hold the database",
            lambda: any(e.kind == "ready" for e in read_log(log, child_running=True)),
            timeout=CHILD_TIMEOUT,
        )
        with pytest.raises(actors.DatabaseInUseError) as info:
            trio.run(open_and_send)
        assert f"pid {c.pid} " in str(info.value)
        assert f"pid {c.pid} " in info.value.owner
        assert handled == []
        c.sigkill()

    # The kernel dropped the dead child's lock: the database is free.
    trio.run(open_and_send)
    assert handled == ["after the child died"]
    integrity_check(db)
