"""Failover benchmark: how long a PostgreSQL cluster's sessions wait after a member dies.

    python -m benchmarks.pg_failover                  # 20 SIGKILLs, 5 clean stops
    python -m benchmarks.pg_failover --kills 40 --url postgresql://user@host/db

Run from the repository's root. Three members on one database (a
throwaway PostgreSQL server of its own, tests/pgserver.py, unless ``--url``
names a database to use; its actors tables are dropped first), each a
``python -m tests.cluster_worker`` process with ``lease_ttl`` 2 s: two
workers and a producer that is a member too, sending every session a
message every ``--interval`` seconds in small parts (steady traffic). The
handlers log their starts to a table (tests/cluster_worker.py).

- **SIGKILL**, ``--kills`` times: once the buckets are spread evenly, a
  worker (seeded random choice) is killed and restarted at once, as a
  supervisor would. Measured from the kill: the first handler start of one
  of the killed worker's sessions (those of the buckets it held) in another
  process, the time by which every one of them had started a handler again,
  and the time by which other members held every one of its buckets.
- **Clean stop**, ``--stops`` times: a worker is sent SIGTERM (it finishes
  its handlers and gives its buckets back), and restarted once it exited.
  Measured from the signal: the same three times.

At the end the producer stops, the cluster drains, and the whole history
is checked as the tests check it (tests/pgcluster.py check_history: nothing
lost or counted twice, order, one handler at a time per session).

Prints a table (p50 / p99 / max, nearest rank) and writes JSON to
``benchmarks/results/pg_failover.json`` (``--out`` to change). The goal:
p99 of the SIGKILL failover under ``lease_ttl`` + 1 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

import actors
from actors.store.buckets import bucket_of
from tests import pgserver
from tests.pgcluster import Cluster, Worker, check_history, cluster

HERE = Path(__file__).resolve().parent
LEASE_TTL = 2.0
BALANCE_TIMEOUT = 60.0  # seconds for the buckets to spread after a restart
FAILOVER_TIMEOUT = 30.0  # seconds for a dead member's sessions to run again
SESSIONS = 120
MEASURES = ("first_start", "all_started", "taken_over")  # seconds after the signal


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least ``p`` of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.50),
        "p99": percentile(values, 0.99),
        "max": max(values),
        "min": min(values),
    }


# -- the cluster ---------------------------------------------------------------


def balanced(c: Cluster, members: list[str]) -> bool:
    """Every live member holds its share (within a rebalance step of it)."""
    owners = c.owners()
    share = c.buckets() // len(members)
    step = max(1, c.buckets() // 16)
    return (
        all(owners.get(m, 0) >= share - step for m in members)
        and sum(owners.get(m, 0) for m in members) == c.buckets()
    )


def sessions_of(c: Cluster, held: set[int]) -> set[str]:
    """The producer's sessions in the buckets ``held``."""
    buckets = c.buckets()
    names = (f"s{i:04d}" for i in range(SESSIONS))
    return {s for s in names if bucket_of(s, buckets) in held}


def held_by_others(c: Cluster, buckets: list[int], member: str) -> int:
    """How many of ``buckets`` another member holds, its lease running."""
    rows = c.sql(
        "SELECT count(*) FROM actors_buckets WHERE bucket = ANY(%s) AND owner <> %s"
        " AND lease_until > now()",
        (buckets, member),
    )
    return int(rows[0][0])


def first_starts(c: Cluster, sessions: set[str], after: float, not_pid: int) -> dict[str, float]:
    """{session: its first handler start after ``after`` in a process other than ``not_pid``}."""
    rows = c.sql(
        "SELECT session, min(started) FROM chaos_log WHERE ended IS NULL AND started > %s"
        " AND pid <> %s AND session = ANY(%s) GROUP BY session",
        (after, not_pid, sorted(sessions)),
    )
    return {s: float(t) for s, t in rows}


def measure_loss(
    c: Cluster, victim: Worker, member: str, how: str, restart: Callable[[], Worker]
) -> dict[str, float]:
    """Kill or stop ``victim``, restart it, and time its sessions' return (see the module).

    A killed worker is restarted at once, as a supervisor would; a stopped
    one once it exited, as a rolling restart would.
    """
    held = [b for (b,) in c.sql("SELECT bucket FROM actors_buckets WHERE owner = %s", (member,))]
    mine = sessions_of(c, set(held))
    assert mine, (
        f"{victim} ({member}) holds none of the producer's sessions: held {len(held)}"
        f" of {c.buckets()}, owners {c.owners()},"
        f" members {c.sql('SELECT id, pid, seen_until FROM actors_members')}"
    )
    if how == "kill":
        at = victim.kill()
        replacement = restart()
    else:
        at = victim.terminate()
    taken = c.wait_until(
        lambda: held_by_others(c, held, member) == len(held),
        FAILOVER_TIMEOUT,
        "the lost member's buckets held by others",
        0.005,
    )
    if how == "stop":
        status = victim.stop()
        assert status == 0, f"{victim} exited with {status}{victim.tail()}"
        replacement = restart()
    # The starts are in the log with their times: polled only to know when
    # every session of the victim ran again.
    c.wait_until(
        lambda: len(first_starts(c, mine, at, victim.pid)) == len(mine),
        FAILOVER_TIMEOUT,
        "every session of the lost member running again",
        0.05,
    )
    replacement.wait_for("ready", FAILOVER_TIMEOUT)
    starts = first_starts(c, mine, at, victim.pid)
    return {
        "first_start": min(starts.values()) - at,
        "all_started": max(starts.values()) - at,
        "taken_over": taken - at,
        "sessions": len(mine),
    }


def run(args: argparse.Namespace, url: str, logdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    slow = ("--handler-time", str(args.handler_time))
    kills: list[dict[str, float]] = []
    stops: list[dict[str, float]] = []
    with cluster(url, logdir, lease_ttl=LEASE_TTL) as c:
        workers = {name: c.start(name, *slow) for name in ("w1", "w2")}
        producer = c.start(
            "p", *slow, "--sessions", str(SESSIONS), "--interval", str(args.interval)
        )
        plan = ["kill"] * args.kills + ["stop"] * args.stops
        rng.shuffle(plan)
        for i, how in enumerate(plan, 1):
            live = [*workers.values(), producer]
            members = [c.member(w) for w in live]
            c.wait_until(partial(balanced, c, members), BALANCE_TIMEOUT, "balanced", 0.1)
            name = rng.choice(sorted(workers))
            victim = workers[name]

            def restart(name: str = name, i: int = i) -> Worker:
                workers[name] = c.spawn(f"{name}.{i}", *slow)
                return workers[name]

            result = measure_loss(c, victim, c.member(victim), how, restart)
            (kills if how == "kill" else stops).append(result)
            print(
                f"{i:3d}/{len(plan)} {how:4s} {victim.name:6s} first start "
                f"{result['first_start']:.3f}s, all {result['all_started']:.3f}s, "
                f"buckets taken over {result['taken_over']:.3f}s",
                flush=True,
            )
        rounds = producer.enough()
        c.wait_until(lambda: c.left() == 0, BALANCE_TIMEOUT, "drained", 0.1)
        for w in c.running():
            w.terminate()
        statuses = {w.name: w.stop() for w in c.running()}
        sent = {f"s{i:04d}": rounds for i in range(SESSIONS)}
        summary = check_history(c.runs(), c.states(), sent, c.crashes(), c.processed())
    return {
        "kills": kills,
        "stops": stops,
        "messages": rounds * SESSIONS,
        "runs": summary.runs,
        "reruns": summary.reruns,
        "problems": summary.problems,
        "exit_statuses": statuses,
    }


# -- the report ----------------------------------------------------------------


def machine(url: str) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    commit = subprocess.run(
        ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "postgresql": row[0] if row else "unknown",
        "psycopg": psycopg.__version__,
        "actors": actors.__version__,
        "git": commit or "unknown",
        "load_average_before": os.getloadavg()[0],
    }


def print_table(result: dict[str, Any]) -> None:
    def line(name: str, s: dict[str, float] | None) -> str:
        if s is None:
            return f"{name:<50} {'-':>8} {'-':>8} {'-':>8} {'':>4}"
        return f"{name:<50} {s['p50']:>7.3f}s {s['p99']:>7.3f}s {s['max']:>7.3f}s {s['n']:>4}"

    k, st, m = result["kill"], result["stop"], result["machine"]
    print()
    print(f"{'lease_ttl = 2 s':<50} {'p50':>8} {'p99':>8} {'max':>8} {'n':>4}")
    print(line("SIGKILL -> first start of its sessions elsewhere", k.get("first_start")))
    print(line("SIGKILL -> all of its sessions started again", k.get("all_started")))
    print(line("SIGKILL -> its buckets all held by others", k.get("taken_over")))
    print(line("SIGTERM -> its buckets all held by others", st.get("taken_over")))
    print(line("SIGTERM -> first start of its sessions elsewhere", st.get("first_start")))
    print(line("SIGTERM -> all of its sessions started again", st.get("all_started")))
    goal = result["goal_seconds"]
    p99 = k["first_start"]["p99"] if k.get("first_start") else math.nan
    print(f"\ngoal: SIGKILL failover p99 < lease_ttl + 1 s = {goal:.1f} s: "
          f"{'met' if p99 < goal else 'NOT met'} ({p99:.3f} s)")  # fmt: skip
    print(
        f"history: {result['messages']:,} messages, {result['runs']:,} handler runs "
        f"({result['reruns']} again after kills), {len(result['problems'])} problems"
    )
    print(
        f"machine: {m['cpus']} CPUs, {m['cpu_model']}, load {m['load_average_before']:.2f} "
        f"before; PostgreSQL {m['postgresql']}, Python {m['python']}, git {m['git']}"
    )


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """The database to run in: ``url`` (emptied of actors' tables), or a throwaway one."""
    if url is not None:
        with psycopg.connect(url, autocommit=True) as conn:
            for (table,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                " AND (tablename LIKE 'actors\\_%%' OR tablename = 'chaos_log')"
            ).fetchall():
                conn.execute(f'DROP TABLE "{table}"')
        yield url
        return
    bindir = pgserver.find_bindir(os.environ)
    if bindir is None:
        raise SystemExit(pgserver.HINT)
    with pgserver.throwaway_server(bindir) as server, pgserver.fresh_database(server) as fresh:
        yield fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between rounds")
    parser.add_argument("--handler-time", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--url", help="a database to use (default: a throwaway server)")
    parser.add_argument("--out", default=str(HERE / "results" / "pg_failover.json"))
    parser.add_argument("--note", default="", help="kept in the JSON (what was measured)")
    args = parser.parse_args()
    with database(args.url) as url, tempfile.TemporaryDirectory(prefix="pg-failover-") as logs:
        host = machine(url)
        started = time.time()
        raw = run(args, url, Path(logs))
    result = {
        "parameters": {
            "lease_ttl": LEASE_TTL,
            "kills": args.kills,
            "stops": args.stops,
            "sessions": SESSIONS,
            "interval": args.interval,
            "handler_time": args.handler_time,
            "seed": args.seed,
            "members": "2 workers + 1 producing member",
        },
        "kill": {k: stats([r[k] for r in raw["kills"]]) for k in MEASURES} if raw["kills"] else {},
        "stop": {k: stats([r[k] for r in raw["stops"]]) for k in MEASURES} if raw["stops"] else {},
        "goal_seconds": LEASE_TTL + 1.0,
        "note": args.note,
        "seconds": time.time() - started,
        **raw,
        "machine": host,
        "command": " ".join(["python -m benchmarks.pg_failover", *sys.argv[1:]]),
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    assert not raw["problems"], raw["problems"]


if __name__ == "__main__":
    main()
