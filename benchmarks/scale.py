"""Scale benchmark: a million pending messages across a hundred thousand sessions.

    python benchmarks/scale.py                      # 1,000,000 messages, 100,000 sessions
    python benchmarks/scale.py --messages 50000 --sessions 10000 --max-active 100

Steps:

1. **Fill.** A fresh database gets its schema from ``run_system`` itself
   (open and close an empty system), then the rows are written directly with
   apsw in one transaction, as ``Store.append`` would write them: ``id = seq``
   from 1, ``state`` 0 (pending), ``attempts`` 0, a JSON body, and
   ``meta.next_seq`` set past the last id. Message ``i`` goes to session
   ``i % sessions``, so every session's queue interleaves with all others.
2. **Measure**, in a fresh child process (so ``ru_maxrss`` counts only the
   run): the time from entering ``run_system`` to the first handler call;
   the peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``, and
   ``/proc/self/statm`` sampled every 20 ms) while every message is
   processed with a no-op handler and ``max_active`` actors; the
   throughput; and the most active actors and waiting sessions seen. The
   handler checks that each session's messages arrive in order.

Prints a table and writes JSON to ``benchmarks/results/scale.json``
(``--out`` to change). tests/test_scale.py imports :func:`fill` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import apsw
import trio

import actors

HERE = Path(__file__).resolve().parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def session_name(j: int) -> str:
    return f"s{j:06d}"


def fill(db: str, messages: int, sessions: int) -> float:
    """Create ``db`` with ``messages`` pending messages over ``sessions`` sessions.

    Returns the seconds the fill took. The body of message ``i`` is
    ``[i // sessions]``: its index within its session.
    """
    started = time.perf_counter()

    async def no_handler(ctx: actors.Context, msg: actors.Message) -> None:
        raise AssertionError("the schema run must not process anything")

    async def create_schema() -> None:
        async with actors.run_system(db, handler=no_handler):
            pass

    trio.run(create_schema)
    conn = apsw.Connection(db)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        assert count == 0, f"{db} is not empty"
        now = time.time()
        with conn:
            conn.executemany(
                "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
                " VALUES (?, ?, ?, 0, 0, ?, ?)",
                (
                    (i + 1, session_name(i % sessions), i + 1, f"[{i // sessions}]", now)
                    for i in range(messages)
                ),
            )
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'next_seq'",
                (messages + 1,),
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


async def measure(db: str, messages: int, max_active: int) -> dict[str, Any]:
    """Run the system over a filled database until everything is processed."""
    rss_start = rss_bytes()
    first_call: float | None = None
    processed = 0
    next_index: dict[str, int] = {}
    out_of_order = 0

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        nonlocal first_call, processed, out_of_order
        if first_call is None:
            first_call = time.perf_counter()
        processed += 1
        expected = next_index.get(msg.session_id, 0)
        if msg.body[0] != expected:
            out_of_order += 1
        next_index[msg.session_id] = msg.body[0] + 1

    peak = {"rss": rss_start, "active": 0, "waiting": 0}
    samples = 0

    async def sampler(system: actors.System) -> None:
        nonlocal samples
        while True:
            peak["rss"] = max(peak["rss"], rss_bytes())
            stats = system.statistics()
            peak["active"] = max(peak["active"], stats.active_actors)
            peak["waiting"] = max(peak["waiting"], stats.waiting_sessions)
            samples += 1
            await trio.sleep(0.02)

    entered = time.perf_counter()
    async with actors.run_system(db, handler=handler, max_active=max_active) as system:
        ready = time.perf_counter()
        pending_at_start = system.statistics().pending
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler, system)
            await system.drain()
            drained = time.perf_counter()
            nursery.cancel_scope.cancel()
        stats = system.statistics()
    left = time.perf_counter()
    peak["rss"] = max(peak["rss"], rss_bytes())
    assert first_call is not None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "pending_at_start": pending_at_start,
        "processed": processed,
        "processed_statistics": stats.processed,
        "pending_after": stats.pending,
        "dead_after": stats.dead,
        "out_of_order": out_of_order,
        "commits": stats.commits,
        "open_seconds": ready - entered,
        "first_handler_seconds": first_call - entered,
        "drain_seconds": drained - entered,
        "processing_seconds": drained - first_call,
        "shutdown_seconds": left - drained,
        "throughput_per_second": processed / (drained - first_call),
        "overall_per_second": processed / (drained - entered),
        "rss_start_bytes": rss_start,
        "rss_peak_sampled_bytes": peak["rss"],
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rss_samples": samples,
        "max_active_actors_seen": peak["active"],
        "max_waiting_sessions_seen": peak["waiting"],
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "trio": trio.__version__,
        "actors": actors.__version__,
        "git": commit,
        # Other work on the machine skews the times: this is the 1-minute
        # load average when the measurement started.
        "load_average_before": os.getloadavg()[0],
    }


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_table(result: dict[str, Any]) -> None:
    r = result["run"]
    p = result["parameters"]
    m = result["machine"]
    rows = [
        (
            "messages / sessions / max_active",
            f"{p['messages']:,} / {p['sessions']:,} / {p['max_active']:,}",
        ),
        ("fill (direct apsw insert)", f"{result['fill_seconds']:.1f} s"),
        ("database size after fill", mib(result["db_bytes"])),
        ("run_system entry -> ready", f"{r['open_seconds']:.2f} s"),
        ("run_system entry -> first handler call", f"{r['first_handler_seconds']:.2f} s"),
        ("processing (first call -> drained)", f"{r['processing_seconds']:.1f} s"),
        ("throughput", f"{r['throughput_per_second']:,.0f} messages/s"),
        ("throughput incl. startup", f"{r['overall_per_second']:,.0f} messages/s"),
        ("CPU time of the run (user + system)", f"{r['cpu_seconds']:.1f} s"),
        ("RSS at entry", mib(r["rss_start_bytes"])),
        ("peak RSS, sampled /proc/self/statm", mib(r["rss_peak_sampled_bytes"])),
        ("peak RSS, ru_maxrss", mib(r["ru_maxrss_bytes"])),
        ("most active actors seen", f"{r['max_active_actors_seen']:,}"),
        ("most waiting sessions seen", f"{r['max_waiting_sessions_seen']:,}"),
        ("store commits", f"{r['commits']:,}"),
        (
            "processed / out of order / left",
            f"{r['processed']:,} / {r['out_of_order']} / {r['pending_after']}",
        ),
        (
            "machine",
            f"{m['cpus']} CPUs, {m['cpu_model']}, {m['memory_gib']} GiB, "
            f"load {m['load_average_before']:.2f} before",
        ),
        (
            "versions",
            f"Python {m['python']}, SQLite {m['sqlite']}, trio {m['trio']}, git {m['git']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--max-active", type=int, default=1000)
    parser.add_argument("--db", help="database path (default: a temporary file)")
    parser.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # the child: measure and print JSON
        result = trio.run(measure, args.db, args.messages, args.max_active)
        print(json.dumps(result))
        return

    host = machine()
    with tempfile.TemporaryDirectory(prefix="actors-scale-") as tmp:
        db = args.db or os.path.join(tmp, "scale.db")
        print(f"filling {db} with {args.messages:,} messages over {args.sessions:,} sessions ...")
        fill_seconds = fill(db, args.messages, args.sessions)
        db_bytes = os.path.getsize(db)
        print(f"filled in {fill_seconds:.1f} s; measuring ...", flush=True)
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--measure",
                f"--db={db}",
                f"--messages={args.messages}",
                f"--max-active={args.max_active}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            sys.exit(f"the measuring run failed:\n{child.stderr[-4000:]}")
        run = json.loads(child.stdout.splitlines()[-1])
    result = {
        "parameters": {
            "messages": args.messages,
            "sessions": args.sessions,
            "max_active": args.max_active,
            "handler": "no-op (checks per-session order)",
        },
        "fill_seconds": fill_seconds,
        "db_bytes": db_bytes,
        "run": run,
        "machine": host,
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    assert run["processed"] >= args.messages and run["out_of_order"] == 0, run
    assert run["pending_after"] == 0, run


if __name__ == "__main__":
    main()
