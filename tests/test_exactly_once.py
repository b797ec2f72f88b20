"""Effectively-once, proven: exact counters and exactly-once chains under kills.

The workload (here and in tests/exactly_once_child.py):

- counters ``c0`` .. ``c3``: each message adds its value to
  ``ctx.state["total"]`` and 1 to ``ctx.state["n"]``;
- chains ``a<i> -> b<i> -> z<i>``: ``a`` and ``b`` count the message and
  forward it with ``ctx.send``; ``z`` records its uid in
  ``ctx.state["seen"]``.

Handlers sleep before and after making their changes, so a kill lands
before anything was applied, or after the changes were made in memory and
before they were committed with the ack. The second case is the one that
matters: the message runs again, and at-least-once delivery would count it
twice. The proof is that it never does:

1. in process, the chaos monkey kills busy actors hundreds of times (on the
   real clock, with the store's committer grouping transactions; and on the
   MockClock, with SQLite inline, for many more kills): every counter's
   total is the exact sum of what was sent to it, and every chain delivers
   every message to its end exactly once;
2. across processes, the child is SIGKILLed at random moments and started
   again on the same file. After every kill the database itself is checked:
   each counter's state holds exactly the messages whose keys are marked
   processed, and each chain's uids are, each exactly once, either pending
   at a later hop or seen at the end. Producers resend what they did not
   see acknowledged, with the same idempotency key. After the last kill a
   child drains the rest, and the totals are exact.

``ACTORS_EXACTLY_ONCE_KILLS`` (default 12) sets the number of SIGKILLs,
``ACTORS_EXACTLY_ONCE_SEED`` the seed. Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.testing
from exactly_once_child import apply
from progress import ProgressPipe

import actors
from actors.testing import chaos, fast_options, quiescent

COUNTERS = [f"c{i}" for i in range(4)]
CHAINS = 2


# -- reading and checking a database -------------------------------------------------


class Snapshot:
    """What a database holds: states, idempotency keys, and messages."""

    def __init__(self, db: Path | str) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.keys: dict[tuple[str, str], bool] = {}
        self.messages: list[tuple[str, str, str | None, int]] = []
        if not Path(db).exists():
            return  # killed before it created the database
        conn = apsw.Connection(str(db))
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            if conn.execute("PRAGMA user_version").fetchall() == [(0,)]:
                return  # killed before the schema was committed: an empty database
            self.states = {
                s: json.loads(v) for s, v in conn.execute("SELECT session_id, value FROM state")
            }
            # {(session, key): processed?}
            self.keys = {
                (s, k): done is not None
                for s, k, done in conn.execute("SELECT session_id, key, done_at FROM keys")
            }
            # (session, uid, key, state) of every message still in the database
            self.messages = [
                (s, json.loads(body)["u"], key, state)
                for s, body, key, state in conn.execute(
                    "SELECT session_id, body, key, state FROM messages"
                )
            ]
        finally:
            conn.close()

    def n(self, session: str) -> int:
        return int(self.states.get(session, {}).get("n", 0))

    def check(self, sent: dict[str, tuple[str, int]], *, keyed: set[str]) -> dict[str, int]:
        """The invariants that hold at any moment, even right after a SIGKILL.

        ``sent``: {uid: (first-hop session, value)} of everything a producer
        tried to send; ``keyed``: the first-hop sessions whose sends carry
        ``key=uid``. Returns {first-hop session: messages it processed}.
        """
        assert not any(state == 2 for *_, state in self.messages), "dead letters"
        processed: dict[str, int] = {}
        pending = Counter((s, uid) for s, uid, _, _ in self.messages)
        assert max(pending.values(), default=1) == 1, "a message is in the database twice"
        for session in COUNTERS:
            state = self.states.get(session, {})
            if session in keyed:
                # The ack marks the key processed in the transaction that
                # writes the state: the two always agree.
                done = {uid for (s, uid), d in self.keys.items() if s == session and d}
                assert state.get("n", 0) == len(done), session
                assert state.get("total", 0) == sum(sent[uid][1] for uid in done), session
                for uid in done:
                    assert (session, uid) not in pending, (session, uid)
            processed[session] = state.get("n", 0)
        for i in range(CHAINS):
            a, b, z = f"a{i}", f"b{i}", f"z{i}"
            done_at_a = [uid for (s, uid), d in self.keys.items() if s == a and d]
            assert self.n(a) == len(done_at_a)
            at_b = [uid for s, uid, _, _ in self.messages if s == b]
            at_z = [uid for s, uid, _, _ in self.messages if s == z]
            seen: dict[str, int] = self.states.get(z, {}).get("seen", {})
            assert set(seen.values()) <= {1}, f"{z} saw a message twice"
            # Every message a processed is in exactly one place downstream:
            # pending at b, pending at z, or seen by z. None lost, none doubled.
            assert Counter(at_b) + Counter(at_z) + Counter(seen) == Counter(done_at_a), i
            assert self.n(b) == len(at_z) + len(seen), i
            processed[a] = len(done_at_a)
        return processed


def expected_states(sent: dict[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """The states once everything in ``sent`` was processed exactly once."""
    states: dict[str, dict[str, Any]] = {}
    for uid, (session, value) in sent.items():
        if session.startswith("c"):
            state = states.setdefault(session, {"total": 0, "n": 0})
            state["total"] += value
            state["n"] += 1
        else:
            for hop in ("a", "b"):
                state = states.setdefault(hop + session[1:], {"n": 0})
                state["n"] += 1
            states.setdefault("z" + session[1:], {"seen": {}})["seen"][uid] = 1
    return states


# -- 1. in process: the chaos monkey -------------------------------------------------


class Workload:
    """The handler, and what it saw: how often each message's changes were made."""

    def __init__(self, seed: int, latency: float) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.applied: Counter[tuple[str, str]] = Counter()  # {(session, uid): times}

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> None:
        uid = msg.body["u"]
        session = ctx.session_id
        await trio.sleep(self.rng.uniform(0, self.latency))
        apply(ctx, msg)
        self.applied[session, uid] += 1
        await trio.sleep(self.rng.uniform(0, self.latency))


KEYED = {"c0", "c1", "a0", "a1"}  # in process, c2 and c3 get plain sends


async def test_counters_and_chains_are_exact_under_the_kill_monkey(
    db_path: str, clock: object
) -> None:
    real = clock is None
    workload = Workload(seed=7, latency=0.0015)
    rng = random.Random(11)
    per_session = 80 if real else 150
    kill_budget = 400 if real else 1500
    sent: dict[str, tuple[str, int]] = {}

    async def sender(system: actors.System, session: str) -> None:
        for k in range(per_session):
            uid = f"{session}-{k}"
            value = rng.randint(-(10**6), 10**6)
            sent[uid] = (session, value)
            body = {"u": uid, "v": value}
            if session in KEYED:
                await system.send(session, body, key=uid)
            else:
                await system.send(session, body)
            await trio.sleep(rng.uniform(0, 0.002))

    async with actors.run_system(
        db_path, handler=workload.handler, **fast_options(max_attempts=10**6)
    ) as system:
        async with chaos(
            system, seed=3, kills_per_second=1000 if real else 2000, max_kills=kill_budget
        ) as monkey:
            async with trio.open_nursery() as nursery:
                for session in [*COUNTERS, *(f"a{i}" for i in range(CHAINS))]:
                    nursery.start_soon(sender, system, session)
            await quiescent(system)
        stats = await quiescent(system)
    kills = monkey.statistics().kills_landed
    reapplied = sum(1 for n in workload.applied.values() if n > 1)
    snapshot = Snapshot(db_path)
    processed = snapshot.check(sent, keyed=KEYED)
    print(
        f"\nkill monkey ({'real' if real else 'mock'} clock): kills={kills} "
        f"messages={len(sent)} handler_runs={stats.processed + stats.failed_attempts} "
        f"reapplied={reapplied} processed={processed}"
    )
    # Exact, every one of them.
    assert snapshot.states == expected_states(sent)
    assert snapshot.messages == [] and stats.dead == 0
    # The proof proved something: kills landed, some after a message's
    # changes were made and before they were committed.
    assert kills >= kill_budget // 4, kills
    assert reapplied > 0
    assert stats.restarts >= kills


# -- 2. across processes: SIGKILL and restart ----------------------------------------

CHILD = Path(__file__).with_name("exactly_once_child.py")
KILLS = int(os.environ.get("ACTORS_EXACTLY_ONCE_KILLS", "12"))
SEED = int(os.environ.get("ACTORS_EXACTLY_ONCE_SEED", "20240720"))
EARLY_KILLS = 0.15  # this share of kills strikes before or during recovery
CHILD_TIMEOUT = 60.0


class History:
    """What the children logged, over all runs."""

    def __init__(self) -> None:
        self.sent: dict[str, tuple[str, int]] = {}  # {uid: (session, value)}
        self.acked: dict[str, int] = {}  # {uid: message id}
        self.applied: Counter[tuple[str, str]] = Counter()
        self.recovered = 0

    def add_run(self, log: Path) -> None:
        if not log.exists():
            return  # killed before it wrote anything
        text = log.read_text()
        # One write() per line: a kill never leaves half of one.
        assert text == "" or text.endswith("\n"), text[-200:]
        for line in text.splitlines():
            kind, *fields = line.split()
            if kind == "sending":
                uid, session, value = fields
                assert self.sent.setdefault(uid, (session, int(value))) == (session, int(value))
            elif kind == "acked":
                uid, message_id = fields[0], int(fields[1])
                assert uid in self.sent
                assert self.acked.setdefault(uid, message_id) == message_id, uid
            elif kind == "applied":
                self.applied[fields[0], fields[1]] += 1
            elif kind == "ready":
                self.recovered += int(fields[1])

    def unacked(self) -> list[tuple[str, str, int]]:
        return [(uid, s, v) for uid, (s, v) in self.sent.items() if uid not in self.acked]


def lines(log: Path, kind: str) -> int:
    """Complete lines of ``kind`` in a log the child may be writing."""
    if not log.exists():
        return 0
    text = log.read_text()
    text = text[: text.rfind("\n") + 1]  # a line being appended can be seen half written
    return sum(1 for line in text.splitlines() if kind == "*" or line.startswith(kind + " "))


@contextlib.contextmanager
def spawn(
    tmp_path: Path, mode: str, db: Path, log: Path, run: int, seed: int, resend: list[Any]
) -> Iterator[tuple[subprocess.Popen[str], ProgressPipe]]:
    resend_file = tmp_path / f"resend-{run:04d}.json"
    resend_file.write_text(json.dumps(resend))
    stderr = (tmp_path / f"run-{run:04d}.stderr").open("w")
    progress = ProgressPipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            mode,
            str(db),
            str(log),
            f"--run={run}",
            f"--seed={seed}",
            f"--resend={resend_file}",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        **progress.popen_options(),
    )
    progress.spawned()
    try:
        yield proc, progress
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=CHILD_TIMEOUT)
        stderr.close()
        progress.close()


def stderr_of(tmp_path: Path, run: int) -> str:
    return (tmp_path / f"run-{run:04d}.stderr").read_text()[-4000:]


@pytest.mark.slow
def test_counters_and_chains_are_exact_across_sigkill_and_restart(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "exactly-once.db"
    history = History()
    keyed = set(COUNTERS) | {f"a{i}" for i in range(CHAINS)}
    early = 0
    saved_by_keys = (
        0  # sends committed but not acknowledged before a kill: the resend found the key
    )
    for run in range(1, KILLS + 1):
        log = tmp_path / f"run-{run:04d}.log"
        resend = history.unacked()
        with spawn(tmp_path, "stream", db, log, run, rng.randrange(2**32), resend) as (
            proc,
            progress,
        ):
            # The kill moment is the random variable: a seeded amount of progress.
            if rng.random() < EARLY_KILLS:
                early += 1
                kind, target = "*", rng.randint(1, 2)  # after "run" (before recovery) or "ready"
            else:
                kind, target = "applied", rng.randint(10, 150)

            def fail(why: str, run: int = run) -> None:
                pytest.fail(f"run {run}: {why}:\n{stderr_of(tmp_path, run)}")

            progress.wait(
                proc,
                lambda log=log, kind=kind, target=target: lines(log, kind) >= target,
                CHILD_TIMEOUT,
                fail,
            )
            assert proc.poll() is None, f"run {run} exited:\n{stderr_of(tmp_path, run)}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=CHILD_TIMEOUT)
            assert proc.returncode == -signal.SIGKILL
        history.add_run(log)
        # Right after the crash, the file is consistent: every acknowledged
        # send is there, and the states agree with what the acks committed.
        snapshot = Snapshot(db)
        assert all((history.sent[uid][0], uid) in snapshot.keys for uid in history.acked)
        saved_by_keys += sum(1 for uid, s, _ in history.unacked() if (s, uid) in snapshot.keys)
        snapshot.check(history.sent, keyed=keyed)

    run = KILLS + 1
    log = tmp_path / f"run-{run:04d}.log"
    with spawn(tmp_path, "drain", db, log, run, rng.randrange(2**32), history.unacked()) as (
        proc,
        _,
    ):
        try:
            out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the final drain did not finish:\n{stderr_of(tmp_path, run)}")
        assert proc.returncode == 0, stderr_of(tmp_path, run)
    history.add_run(log)
    final = json.loads(out)
    snapshot = Snapshot(db)
    processed = snapshot.check(history.sent, keyed=keyed)

    # Every send was acknowledged in the end (resent if need be), and each
    # one was applied exactly once: the totals are exact.
    assert history.unacked() == []
    assert final["pending"] == 0 and final["in_flight"] == 0 and final["dead"] == 0, final
    assert snapshot.messages == []
    assert snapshot.states == expected_states(history.sent)
    assert len(set(history.acked.values())) == len(history.acked)  # one message per uid

    reapplied = sum(1 for n in history.applied.values() if n > 1)
    counter_sum = sum(v for s, v in history.sent.values() if s.startswith("c"))
    print(
        f"\nexactly-once under SIGKILL: seed={SEED} kills={KILLS} early_kills={early} "
        f"messages={len(history.sent)} counter_sum={counter_sum} "
        f"chain_messages={sum(1 for s, _ in history.sent.values() if s.startswith('a'))} "
        f"recovered={history.recovered} reapplied={reapplied} saved_by_keys={saved_by_keys} "
        f"processed={processed}"
    )
    # The proof proved something: kills left work in flight, and some
    # messages had their changes made twice (committed once).
    assert len(history.sent) >= 10 * KILLS
    assert history.recovered > 0
    assert reapplied > 0
