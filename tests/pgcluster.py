"""Worker processes of a PostgreSQL cluster, and the history their handlers logged.

For tests/test_postgres_processes.py and benchmarks/pg_failover.py. A
:class:`Cluster` starts members (``python -m tests.cluster_worker``, see
there), SIGKILLs, freezes (SIGSTOP), thaws (SIGCONT) and stops (SIGTERM)
them, remembering when, and reads the database: the buckets' owners, the
handlers' log (``chaos_log``), the sessions' states. :func:`check_history`
checks what every process's handlers did against what was sent, the kills
and the freezes.

The members are separate OS processes: nothing of theirs can wake the
parent. Where the parent waits for something to happen in the database
(:meth:`Cluster.wait_until`), it polls the database with a deadline.
Output lines of a worker (``ready``, ``sent``, ``stopped``) are read by a
thread per worker and waited for without polling.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # seconds for a worker to be up (imports, connections, schema)
STOP_TIMEOUT = 30.0  # seconds for a SIGTERMed worker to exit
POLL = 0.02  # seconds between two looks at the database


class WorkerError(AssertionError):
    """A worker did not do what it should have (its stderr's end attached)."""


class Worker:
    """One member process: its output lines, and what was done to it."""

    def __init__(self, name: str, url: str, args: list[str], logdir: Path) -> None:
        self.name = name
        self.stderr_path = logdir / f"{name}-{time.monotonic_ns()}.stderr"
        # The worker imports actors and tests from ROOT; PYTHONPATH as given
        # comes first, so that a run can point the workers at another actors.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT)])}
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster_worker", url, "--name", name, *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.pid = self.proc.pid
        self.lines: list[str] = []  # its stdout so far, "" for its end
        self._more = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.killed_at: float | None = None
        self.frozen_at: float | None = None
        self.thawed_at: float | None = None
        self.terminated_at: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._more:
                self.lines.append(line.strip())
                self._more.notify_all()
        with self._more:
            self.lines.append("")
            self._more.notify_all()

    def said(self, word: str) -> list[str] | None:
        """The fields of its first output line that starts with ``word``, if there is one yet."""
        with self._more:
            for line in self.lines:
                if line.split()[:1] == [word]:
                    return line.split()
        return None

    def wait_for(self, word: str, timeout: float) -> list[str]:
        """The fields of its first output line that starts with ``word``, once there is one."""
        with self._more:
            if not self._more.wait_for(
                lambda: self.said(word) is not None or self.lines[-1:] == [""], timeout
            ):
                raise WorkerError(f"{self}: no {word!r} line in {timeout}s{self.tail()}")
        found = self.said(word)
        if found is None:
            self.proc.wait()
            raise WorkerError(
                f"{self} exited ({self.proc.returncode}) before {word!r}{self.tail()}"
            )
        return found

    def tail(self, chars: int = 3000) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return f"\n--- stderr of {self}:\n{text[-chars:]}" if text else ""

    def kill(self) -> float:
        """SIGKILL; returns the time it was sent (the process is gone on return)."""
        at = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)
        self.killed_at = at
        return at

    def enough(self) -> int:
        """Tell a producer to stop sending (SIGUSR1); the rounds it sent, once it stopped."""
        self.proc.send_signal(signal.SIGUSR1)
        return int(self.wait_for("sent", STOP_TIMEOUT)[1])

    def freeze(self) -> float:
        self.frozen_at = time.time()
        self.proc.send_signal(signal.SIGSTOP)
        return self.frozen_at

    def thaw(self) -> float:
        self.proc.send_signal(signal.SIGCONT)
        self.thawed_at = time.time()
        return self.thawed_at

    def terminate(self) -> float:
        """SIGTERM (a clean stop); the time it was sent."""
        self.terminated_at = time.time()
        self.proc.send_signal(signal.SIGTERM)
        return self.terminated_at

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (once: a second one stops at once, or kills), and its exit status."""
        if self.proc.poll() is None and self.terminated_at is None:
            self.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"{self} did not stop within {timeout}s{self.tail()}") from None

    def __str__(self) -> str:
        return f"worker {self.name} (pid {self.pid})"


class Cluster:
    """Members of one database's cluster, started and hurt by the caller."""

    def __init__(self, url: str, logdir: Path, *, lease_ttl: float = 2.0) -> None:
        self.url = url
        self.logdir = logdir
        self.lease_ttl = lease_ttl
        self.workers: list[Worker] = []  # every one started, in order
        self._conn = psycopg.connect(url, autocommit=True)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS chaos_log (session text, n int, worker text, pid int,"
            " started double precision, ended double precision)"
        )

    def spawn(self, name: str, *args: str) -> Worker:
        """Start a member (``args``: tests/cluster_worker.py's options); returns at once."""
        worker = Worker(name, self.url, ["--lease-ttl", str(self.lease_ttl), *args], self.logdir)
        self.workers.append(worker)
        return worker

    def start(self, name: str, *args: str) -> Worker:
        """Start a member and wait until it runs (``ready``)."""
        worker = self.spawn(name, *args)
        worker.wait_for("ready", START_TIMEOUT)
        return worker

    def running(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def close(self) -> None:
        """Kill whatever still runs (a test that failed midway), and disconnect."""
        for worker in self.workers:
            if worker.proc.poll() is None:
                with contextlib.suppress(OSError):
                    worker.proc.send_signal(signal.SIGCONT)
                    worker.proc.kill()
                worker.proc.wait()
        self._conn.close()

    # -- the database --------------------------------------------------------------

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        cur = self._conn.execute(query, params)
        return cur.fetchall() if cur.description else []

    def member(self, worker: Worker) -> str:
        """The worker's member id (its row in actors_members, by pid)."""
        rows = self.sql(
            "SELECT id FROM actors_members WHERE pid = %s ORDER BY started_at DESC LIMIT 1",
            (worker.pid,),
        )
        if not rows:
            raise WorkerError(f"{worker} is not a member{worker.tail()}")
        return str(rows[0][0])

    def owners(self) -> dict[str | None, int]:
        """{owner: buckets it holds with a lease not run out} (None: free or expired)."""
        rows = self.sql(
            "SELECT CASE WHEN lease_until > now() THEN owner END AS o, count(*)"
            " FROM actors_buckets GROUP BY o"
        )
        return {owner: int(n) for owner, n in rows}

    def buckets(self) -> int:
        return int(self.sql("SELECT value FROM actors_meta WHERE key = 'buckets'")[0][0])

    def left(self) -> int:
        """Messages in the database (pending, in flight or dead)."""
        return int(self.sql("SELECT count(*) FROM actors_messages")[0][0])

    def wait_until(
        self, condition: Callable[[], bool], timeout: float, what: str, poll: float = POLL
    ) -> float:
        """Poll until ``condition()`` (it reads the database the workers change); the time."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                alive = [w for w in self.workers if w.proc.poll() is None]
                raise WorkerError(
                    f"not {what} after {timeout}s; owners {self.owners()}, "
                    f"{self.left()} messages left" + "".join(w.tail(1500) for w in alive)
                )
            # Another process changes what is polled: no event of ours says when.
            time.sleep(poll)
        return time.time()

    def states(self) -> dict[str, dict[str, Any]]:
        return {s: json.loads(v) for s, v in self.sql("SELECT session_id, value FROM actors_state")}

    def processed(self) -> int:
        """Acknowledgements ever committed, by every member (actors_members and the total)."""
        rows = self.sql(
            "SELECT (SELECT coalesce(sum(processed), 0) FROM actors_members)"
            " + (SELECT value::bigint FROM actors_meta WHERE key = 'processed')"
        )
        return int(rows[0][0])

    def runs(self) -> list[Run]:
        """Every handler run in chaos_log, by start time (see tests/cluster_worker.py)."""
        ends = {
            (pid, s, n, started): ended
            for s, n, pid, started, ended in self.sql(
                "SELECT session, n, pid, started, ended FROM chaos_log WHERE ended IS NOT NULL"
            )
        }
        return sorted(
            (
                Run(s, n, worker, pid, started, ends.get((pid, s, n, started)))
                for s, n, worker, pid, started in self.sql(
                    "SELECT session, n, worker, pid, started FROM chaos_log WHERE ended IS NULL"
                )
            ),
            key=lambda r: (r.started, r.pid),
        )

    def crashes(self) -> dict[int, Crash]:
        """{pid: how its process was hurt} for every worker killed or frozen."""
        out = {}
        for w in self.workers:
            if w.killed_at is not None:
                out[w.pid] = Crash(at=w.killed_at, killed=True, thawed_at=w.thawed_at)
            elif w.frozen_at is not None:
                out[w.pid] = Crash(at=w.frozen_at, killed=False, thawed_at=w.thawed_at)
        return out


@dataclass(frozen=True)
class Run:
    """One handler run: its start row, and its end row's time if it returned."""

    session: str
    n: int
    worker: str
    pid: int
    started: float
    ended: float | None


@dataclass(frozen=True)
class Crash:
    """A process SIGKILLed (``killed``) or SIGSTOPped at ``at``."""

    at: float
    killed: bool
    thawed_at: float | None = None


@dataclass
class Summary:
    """What :func:`check_history` found (``problems`` empty: every invariant held)."""

    problems: list[str] = field(default_factory=list)
    runs: int = 0
    reruns: int = 0  # runs of a (session, n) beyond its first
    overlaps_with_frozen: int = 0  # runs of frozen processes that overlapped another
    starts_after_thaw: int = 0  # starts in a frozen process after it was thawed
    # ... of a message another process had started since the freeze: the
    # thawed process ran it although its bucket had moved on
    stale_starts: int = 0
    ends_after_thaw: int = 0  # runs started before a freeze that returned after the thaw

    def fail(self, text: str) -> None:
        if len(self.problems) < 30:
            self.problems.append(text)


def check_history(
    runs: list[Run],
    states: dict[str, dict[str, Any]],
    sent: dict[str, int],
    crashes: dict[int, Crash],
    processed: int,
) -> Summary:
    """Check the handlers' history of a run against what was sent (``{session: messages}``,
    numbered 1..k in send order) and what was done to the processes.

    - Nothing acknowledged is lost, nothing counted twice: each session's
      committed state has ``count`` == its messages and ``last`` == k (the
      state is committed with the ack, fenced by the bucket's epoch); the
      members' processed counters never add up to more than was sent, and
      to exactly that when no process was killed or frozen (a member writes
      its count at each lease renewal: a killed one loses its last round's).
    - Order: a session's starts, in time, go 1, 2, 3...; a start never
      skips ahead of every start before it; one that does not follow its
      predecessor (a repeat or a step back) comes after that predecessor's
      process (or its own) was killed or frozen.
    - One handler at a time per session: two runs of a session overlap in
      time only if one of them was in a frozen process. A run in a killed
      process that did not return ended at the kill. Every run in a process
      neither killed nor frozen returned.
    """
    out = Summary(runs=len(runs))
    total = sum(sent.values())
    if processed > total or (not crashes and processed != total):
        out.fail(f"the members' processed counters say {processed}, {total} were sent")
    for session, k in sent.items():
        state = states.get(session)
        if state is None or state.get("count") != k or state.get("last") != k:
            out.fail(f"{session}: state {state}, {k} messages sent")
    extra = set(states) - set(sent)
    if extra:
        out.fail(f"states of sessions never sent to: {sorted(extra)[:5]}")

    by_session: defaultdict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_session[run.session].append(run)
    seen: set[tuple[str, int]] = set()
    for run in runs:
        key = (run.session, run.n)
        if key in seen:
            out.reruns += 1
        seen.add(key)
    for session, k in sent.items():
        missing = [n for n in range(1, k + 1) if (session, n) not in seen]
        if missing:
            out.fail(f"{session}: messages never started: {missing[:10]}")
    for session, mine in by_session.items():
        _check_order(session, mine, crashes, out)
        _check_overlaps(session, mine, crashes, out)
    _count_thawed(runs, crashes, out)
    return out


def _count_thawed(runs: list[Run], crashes: dict[int, Crash], out: Summary) -> None:
    """What frozen processes did once thawed (see Summary)."""
    started_elsewhere: dict[tuple[str, int], float] = {}
    for run in runs:
        key = (run.session, run.n)
        crash = crashes.get(run.pid)
        if crash is None or crash.killed or crash.thawed_at is None:
            started_elsewhere.setdefault(key, run.started)
            continue
        if run.started > crash.thawed_at:
            out.starts_after_thaw += 1
            first = started_elsewhere.get(key)
            if first is not None and first > crash.at:
                out.stale_starts += 1
        elif run.started < crash.at and run.ended is not None and run.ended > crash.thawed_at:
            out.ends_after_thaw += 1


def _crashed_before(pid: int, when: float, crashes: dict[int, Crash]) -> bool:
    crash = crashes.get(pid)
    return crash is not None and crash.at <= when


def _check_order(session: str, runs: list[Run], crashes: dict[int, Crash], out: Summary) -> None:
    top = 0
    prev: Run | None = None
    for run in runs:
        if run.n > top + 1:
            out.fail(f"{session}: n={run.n} started (pid {run.pid}) before n={top + 1} ever had")
        if prev is not None and run.n != prev.n + 1:
            if not (
                _crashed_before(prev.pid, run.started, crashes)
                or _crashed_before(run.pid, run.started, crashes)
            ):
                out.fail(
                    f"{session}: n={run.n} started at {run.started:.3f} (pid {run.pid}) after "
                    f"n={prev.n} (pid {prev.pid}), and neither process had crashed"
                )
        elif prev is None and run.n != 1:
            out.fail(f"{session}: the first start is n={run.n}")
        top = max(top, run.n)
        prev = run


def _check_overlaps(session: str, runs: list[Run], crashes: dict[int, Crash], out: Summary) -> None:
    spans: list[tuple[float, float, Run]] = []
    for run in runs:
        crash = crashes.get(run.pid)
        end = run.ended
        if end is None:
            if crash is None:
                out.fail(f"{session}: n={run.n} in pid {run.pid} never returned, no crash there")
                continue
            # Killed: it ran until the kill. Frozen: it may have run on after the thaw.
            end = crash.at if crash.killed else float("inf")
        spans.append((run.started, end, run))
    frozen = {pid for pid, crash in crashes.items() if not crash.killed}
    overlapping: set[Run] = set()
    # Sorted by start: a sweep keeps the runs that may still be running.
    active: list[tuple[float, Run]] = []
    for start, end, run in spans:
        active = [(e, r) for e, r in active if e > start]
        for end1, run1 in active:
            if {run1.pid, run.pid} & frozen:
                overlapping.update(r for r in (run1, run) if r.pid in frozen)
            else:
                out.fail(
                    f"{session}: n={run1.n} (pid {run1.pid}, {run1.started:.3f}-{end1:.3f}) "
                    f"overlaps n={run.n} (pid {run.pid}, from {start:.3f})"
                )
        active.append((end, run))
    out.overlaps_with_frozen += len(overlapping)


@contextlib.contextmanager
def cluster(url: str, logdir: Path, *, lease_ttl: float = 2.0) -> Iterator[Cluster]:
    """A :class:`Cluster` whose processes are all gone at the end, whatever happened."""
    c = Cluster(url, logdir, lease_ttl=lease_ttl)
    try:
        yield c
    finally:
        c.close()
