"""Crash-restart soak: SIGKILL a sending, processing system at random moments.

A child process (tests/soak_child.py) runs the system on one database file:
one sender per session sends continuously (single sends and small
``send_many`` batches) while the handler processes, fails "bad" messages
every time and "flaky" ones once. The parent SIGKILLs it at a random moment
(seeded ``random.Random``: sometimes before the system is even up, usually
0-300 ms after), checks the file, and starts the next child on the same
file. After the last kill, a child drains what is left and reports the dead
letters. Then the whole history is checked:

- after each crash: ``PRAGMA integrity_check`` is ok; every message
  acknowledged so far is in the database or was processed; a session's
  messages in flight (claimed on delivery, or handled with the ack not yet
  committed) are recorded;
- every acknowledged message was processed or dead-lettered, and nothing
  is left pending;
- per-session order: a session's messages complete for the first time in
  send order, and none starts before every earlier message of its session
  (that will ever complete) has completed;
- one handler at a time per session, within each run;
- attempts are honest: a message's successive starts have increasing
  ``attempt``, the first one 1 (a message claimed but never started before
  a kill gets its attempt back); a message starts again only after it
  failed, or after it started in a run that was killed while it was in
  flight; it completes twice only in the second case (duplicates only for
  messages in flight at a kill);
- dead letters only for messages that used up their attempts: every "bad"
  message, with ``attempts == max_attempts``, and otherwise only a message
  whose attempts were all used up by kills while it was in flight;
- the soak did what it says: kills left messages in flight for recovery,
  bad messages went to dead letters, flaky ones were retried.

``ACTORS_SOAK_KILLS`` (default 20) sets the number of kills,
``ACTORS_SOAK_SEED`` the seed. The summary line printed at the end (run with
``-s``) is what docs/reliability.md quotes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest
from progress import ProgressPipe

CHILD = Path(__file__).with_name("soak_child.py")
MAX_ATTEMPTS = 4  # soak_child.MAX_ATTEMPTS
KILLS = int(os.environ.get("ACTORS_SOAK_KILLS", "20"))
SEED = int(os.environ.get("ACTORS_SOAK_SEED", "20240611"))
EARLY_KILLS = 0.15  # this share of kills does not wait for the system to be up
KILL_AFTER = 0.3  # otherwise: uniform(0, this) seconds after "ready"
CHILD_TIMEOUT = 60.0


# -- the history --------------------------------------------------------------


class Event:
    """One log line: ``kind id session index mkind [attempt]`` at a place in the history."""

    __slots__ = ("attempt", "id", "index", "kind", "mkind", "pos", "run", "session")

    def __init__(self, run: int, pos: int, fields: list[str]) -> None:
        self.run = run
        self.pos = pos
        self.kind = fields[0]
        self.id = int(fields[1])
        self.session = fields[2]
        self.index = int(fields[3])
        self.mkind = fields[4]
        self.attempt = int(fields[5]) if len(fields) > 5 else 0


class History:
    """Everything every child logged, in order, and what the checks learn from it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.killed_runs: set[int] = set()
        self.recovered: dict[int, int] = {}  # run -> messages recovered at its start
        self.acked: dict[int, Event] = {}
        self.done: set[int] = set()
        self.identity: dict[int, tuple[str, int, str]] = {}
        # (run, session) -> id of the last message the session started in that run
        self.last_start: dict[tuple[int, str], int] = {}
        # run -> messages in flight in the database right after its kill
        self.in_flight_after: dict[int, set[int]] = {}
        # (run, id): the message started in that run
        self.started_in: set[tuple[int, int]] = set()

    def add_run(self, run: int, log: Path, *, killed: bool) -> None:
        if killed:
            self.killed_runs.add(run)
        if not log.exists():
            return  # killed before it wrote anything
        text = log.read_text()
        # One write() per line: a kill never leaves half of one.
        assert text == "" or text.endswith("\n"), text[-200:]
        for line in text.splitlines():
            fields = line.split()
            if fields[0] == "run":
                assert int(fields[1]) == run, line
                continue
            if fields[0] == "ready":
                self.recovered[run] = int(fields[2])
                continue
            e = Event(run, len(self.events), fields)
            self.events.append(e)
            ident = (e.session, e.index, e.mkind)
            assert self.identity.setdefault(e.id, ident) == ident, (e.id, ident)
            if e.kind == "acked":
                assert e.id not in self.acked, e.id
                self.acked[e.id] = e
            elif e.kind == "done":
                self.done.add(e.id)
            elif e.kind == "start":
                self.last_start[run, e.session] = e.id
                self.started_in.add((run, e.id))

    def in_flight_at_kill(self, message_id: int, run: int) -> bool:
        """Whether the message started in ``run``, a killed run, and was in flight after the kill.

        (Its session's last start, or an earlier one handled but whose ack had
        not committed yet.)
        """
        return (
            run in self.killed_runs
            and (run, message_id) in self.started_in
            and message_id in self.in_flight_after.get(run, ())
        )

    def in_flight_after_any_kill(self, message_id: int) -> bool:
        return any(message_id in ids for ids in self.in_flight_after.values())


def check_after_crash(db: Path, history: History, run: int) -> int:
    """The file after a SIGKILL: intact, nothing acknowledged missing. Returns its row count."""
    conn = apsw.Connection(str(db))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages'").fetchall():
            # Killed before the schema was created (it commits whole or not at all).
            assert not history.acked
            return 0
        ids = {row[0] for row in conn.execute("SELECT id FROM messages")}
        history.in_flight_after[run] = {
            row[0] for row in conn.execute("SELECT id FROM messages WHERE state = 1")
        }
    finally:
        conn.close()
    lost = sorted(set(history.acked) - ids - history.done)
    assert not lost, f"{len(lost)} acknowledged messages neither stored nor processed: {lost[:10]}"
    return len(ids)


def check_history(history: History, final: dict[str, object]) -> tuple[dict[str, int], list[int]]:
    """The invariants over the whole history.

    Returns counts for the summary, and the messages delivered more often
    than ``max_attempts`` (for the test to report after everything else).
    """
    events = history.events
    dead_letters = {d[0]: d for d in final["dead_letters"]}  # type: ignore[attr-defined]
    dead = set(dead_letters)
    starts: defaultdict[int, list[Event]] = defaultdict(list)
    dones: defaultdict[int, list[Event]] = defaultdict(list)
    fails: defaultdict[int, list[Event]] = defaultdict(list)
    by_kind = {"start": starts, "done": dones, "fail": fails}
    for e in events:
        if e.kind in by_kind:
            by_kind[e.kind][e.id].append(e)

    # Nothing lost: every acknowledged message (and every one a handler ever
    # saw) was processed or is a dead letter; nothing is left.
    assert final["pending"] == 0 and final["in_flight"] == 0, final
    assert final["dead"] == len(dead), final
    for ids, what in ((set(history.acked), "acknowledged"), (set(starts), "started")):
        lost = sorted(ids - set(dones) - dead)
        assert not lost, f"{len(lost)} {what} messages neither processed nor dead: {lost[:10]}"

    # One handler at a time per session, within a run.
    running: dict[tuple[int, str], int] = {}
    for e in events:
        key = (e.run, e.session)
        if e.kind == "start":
            assert key not in running, f"{e.session}: {e.id} started while {running[key]} ran"
            running[key] = e.id
        elif e.kind in ("done", "fail"):
            assert running.pop(key, None) == e.id, (e.kind, e.id, e.run)

    # Per-session order of first completion is id (= send) order, and no
    # message starts before the earlier ones of its session that will
    # complete have completed.
    first_done: dict[int, int] = {m: occ[0].pos for m, occ in dones.items()}
    by_session: defaultdict[str, list[int]] = defaultdict(list)
    for m in sorted(first_done, key=first_done.__getitem__):
        by_session[history.identity[m][0]].append(m)
    for session, ids in by_session.items():
        assert ids == sorted(ids), f"{session}: first completions out of order"
    done_before: dict[int, int] = {}  # id -> max first-done position of smaller ids, per session
    for ids in by_session.values():
        highest = -1
        for m in sorted(ids):
            done_before[m] = highest
            highest = max(highest, first_done[m])
    for m, occ in starts.items():
        if m in done_before:
            assert occ[0].pos > done_before[m], (
                f"message {m} started before an earlier one completed"
            )

    # Honest attempts; repeats only after a failure or a kill mid-message.
    duplicates = 0
    for m, occ in starts.items():
        attempts = [e.attempt for e in occ]
        assert attempts == sorted(set(attempts)) and attempts[0] >= 1, (m, attempts)
        # Claimed but never started before a kill: the attempt was given back.
        # (Killed between the start mark and the handler's log line, it
        # counts, and then this message was in flight after that kill.)
        assert attempts[0] == 1 or history.in_flight_after_any_kill(m), (m, attempts)
        failed_at = {(e.run, e.attempt) for e in fails.get(m, [])}
        for e in occ[:-1]:
            assert (e.run, e.attempt) in failed_at or history.in_flight_at_kill(m, e.run), (
                f"message {m} started again after attempt {e.attempt} in run {e.run}, "
                "which neither failed nor was in flight at a kill"
            )
    for m, occ in dones.items():
        if len(occ) > 1:
            duplicates += len(occ) - 1
            for e in occ[:-1]:
                assert history.in_flight_at_kill(m, e.run), (
                    f"message {m} completed twice, but was not in flight at a kill in run {e.run}"
                )

    # Dead letters only for messages that used up their attempts.
    bad = {m for m, (_, _, kind) in history.identity.items() if kind == "bad"}
    assert bad <= dead, f"bad messages not dead-lettered: {sorted(bad - dead)[:10]}"
    crash_dead = 0
    for m, (_, session, body, attempts, reason) in dead_letters.items():
        assert history.identity[m] == (session, body[1], body[2]), m
        assert attempts >= MAX_ATTEMPTS, (m, attempts, reason)  # used up (see over_max below)
        if m in bad:
            assert m not in dones, m
            continue
        # Not a bad message: only kills can have used up its attempts.
        crash_dead += 1
        assert "process died" in reason, (m, reason)
        for e in starts.get(m, []):
            assert (e.run, e.attempt) in {(f.run, f.attempt) for f in fails.get(m, [])} or (
                history.in_flight_at_kill(m, e.run)
            ), (m, e.run)

    # Deliveries beyond max_attempts (checked last, by the test).
    over_max = sorted(
        {m for m, occ in starts.items() if occ[-1].attempt > MAX_ATTEMPTS}
        | {m for m, d in dead_letters.items() if d[3] > MAX_ATTEMPTS}
    )

    retried = sum(
        1 for m, occ in starts.items() if history.identity[m][2] == "flaky" and len(occ) > 1
    )
    return {
        "acked": len(history.acked),
        "processed": len(dones),
        "duplicates": duplicates,
        "dead_bad": len(bad & dead),
        "dead_after_crashes": crash_dead,
        "flaky_retried": retried,
        "recovered": sum(history.recovered.values()),
    }, over_max


# -- the soak -------------------------------------------------------------------


PROGRESS: dict[int, ProgressPipe] = {}  # {child pid: its progress pipe}


@contextlib.contextmanager
def spawn(
    tmp_path: Path, mode: str, db: Path, log: Path, run: int, seed: int
) -> Iterator[subprocess.Popen[str]]:
    stderr = (tmp_path / f"run-{run:05d}.stderr").open("w")
    progress = ProgressPipe()
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(db), str(log), f"--run={run}", f"--seed={seed}"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        **progress.popen_options(),
    )
    progress.spawned()
    PROGRESS[proc.pid] = progress
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=CHILD_TIMEOUT)
        stderr.close()
        PROGRESS.pop(proc.pid).close()


def stderr_of(tmp_path: Path, run: int) -> str:
    return (tmp_path / f"run-{run:05d}.stderr").read_text()[-4000:]


def wait_ready(proc: subprocess.Popen[str], log: Path, tmp_path: Path, run: int) -> None:
    """Look at the log each time the child writes to it, until it says ready."""

    def fail(why: str) -> None:
        pytest.fail(f"run {run}: {why} before it was ready:\n{stderr_of(tmp_path, run)}")

    PROGRESS[proc.pid].wait(
        proc, lambda: log.exists() and "\nready " in log.read_text(), CHILD_TIMEOUT, fail
    )


@pytest.mark.slow
def test_sigkill_soak(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "soak.db"
    history = History()
    rows_after_crash: list[int] = []
    for run in range(1, KILLS + 1):
        log = tmp_path / f"run-{run:05d}.log"
        with spawn(tmp_path, "stream", db, log, run, rng.randrange(2**32)) as proc:
            if rng.random() >= EARLY_KILLS:
                wait_ready(proc, log, tmp_path, run)
            # The kill moment itself is the random variable of the soak: not a
            # wait for something, but a seeded point in time to strike at.
            time.sleep(rng.uniform(0, KILL_AFTER))
            # "stream" never exits by itself: it must still be running to be killed.
            assert proc.poll() is None, f"run {run} exited:\n{stderr_of(tmp_path, run)}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=CHILD_TIMEOUT)
            assert proc.returncode == -signal.SIGKILL
        history.add_run(run, log, killed=True)
        rows_after_crash.append(check_after_crash(db, history, run))

    run = KILLS + 1
    log = tmp_path / f"run-{run:05d}.log"
    with spawn(tmp_path, "drain", db, log, run, rng.randrange(2**32)) as proc:
        try:
            out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the final drain did not finish:\n{stderr_of(tmp_path, run)}")
        assert proc.returncode == 0, stderr_of(tmp_path, run)
    history.add_run(run, log, killed=False)
    final = json.loads(out)
    summary, over_max = check_history(history, final)

    # The soak exercised what it claims to: work was left behind by kills,
    # in flight at some of them, bad and flaky messages did their thing.
    assert summary["acked"] >= 10 * KILLS, summary
    assert sum(1 for n in rows_after_crash if n > 0) >= KILLS // 2, rows_after_crash
    assert summary["recovered"] > 0, summary
    assert summary["dead_bad"] > 0 and summary["flaky_retried"] > 0, summary
    print(
        f"\nsoak: seed={SEED} kills={KILLS} over_max_attempts={len(over_max)} "
        + " ".join(f"{k}={v}" for k, v in summary.items())
    )

    # No message is delivered more than max_attempts times (docs/guarantees.md,
    # 5: "ends in dead letters after max_attempts attempts"; a bystander's last
    # attempt "says attempt == max_attempts").
    assert not over_max, (
        f"{len(over_max)} message(s) delivered with attempt > max_attempts={MAX_ATTEMPTS}: "
        + "; ".join(
            f"{m}: attempts "
            + ",".join(
                f"{e.attempt}@run{e.run}" for e in history.events if e.id == m and e.kind == "start"
            )
            for m in over_max[:5]
        )
    )
