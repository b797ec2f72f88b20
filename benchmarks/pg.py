"""``actors`` on PostgreSQL against its peers: ``python -m benchmarks.pg [--rounds 5]``.

One run, one PostgreSQL 15 server that the run starts itself (tests/pgserver.py,
in a temporary directory on the real disk; or ``ACTORS_BENCH_POSTGRES=url``
to use an existing one, whose settings are then only reported), with
``fsync``, ``synchronous_commit`` and ``full_page_writes`` on
(``--server durable``, the default; ``fast`` turns the three off as the
tests' servers do; ``both`` runs every scenario under each). See
benchmarks/pg_server.py for the settings and for what is read of the server.

The workload, the same for every system: ``--messages`` messages (the JSON
``{"n": k}``, or the peer's equivalent) to ``--sessions`` keys (100), a
no-op handler, from the first send until the whole database is drained.
Every scenario run gets a fresh database and W worker processes, each a
separate OS process started for it (benchmarks/pg_worker.py). The topology
is that of a cluster whose members all produce and consume: each process
sends its share (message ``k`` from process ``k % W``, to key ``k %
sessions``) while it runs its worker, so with W processes (W-1)/W of the
messages are sent by a process that does not run their key (for actors:
committed, then announced to the owner with NOTIFY). The clock starts when
the runner says GO to every process (all up, connected and idle; for
actors, the buckets spread evenly over the processes) and stops when the
last one has seen the database drained, after every process's sends
returned (a barrier: a process that stopped counting early would hide the
CPU it spends on the others' messages).

Scenarios (a round runs each once, in this order):

- ``actors_w1``, ``actors_w2``, ``actors_w4``: ``run_system(url,
  handler=noop, lease_ttl=2)`` in each of 1, 2, 4 processes; ``send_many``
  batches of ``--batch`` (100) from ``--producers`` tasks (4) per process;
  the end is ``await system.drain()`` (cluster-wide). ``lease_ttl`` is 2 s
  rather than the default 10 only so that the buckets spread over new
  processes in a few seconds before the clock starts (a member gives back a
  sixteenth of the buckets per lease round, ``lease_ttl / 4``); renewing
  is one small transaction per process per half second.
- ``actors_send_w2``: the same with one ``send()`` per message, from 50
  tasks per process, each awaiting its sends one after the other.
- ``latency_w2``: ``await system.send()`` paced at half the median msg/s
  of ``actors_w2`` so far (the issue's target: half the end-to-end load),
  from the many tasks of benchmarks/e2e.py's open-loop harness in each of
  2 processes, for ``--latency-seconds``: p50/p99 of ``send()``, and of send
  -> handler start (across processes: the send's ``perf_counter()``, one
  clock for the host, travels in the body). ``latency_send_w2``: the same
  at half the median msg/s of ``actors_send_w2`` (the load of a workload
  that sends one message per ``send()``: what single sends sustain is far
  less than send_many's batches, and half of the latter can be more than
  single sends can carry). ``latency_1000_w2``: the same
  at a fixed 1,000 msg/s (``--latency-fixed``), far below what one
  ``send()`` per message sustains: so that load and structure can be told
  apart.
- ``procrastinate_w1``, ``_w2`` (3.x, psycopg connector): a no-op task
  deferred with ``lock=key`` (its per-key order: a job does not start while
  an earlier job of its lock waits or runs), through the job manager's
  batch defer (one statement per batch, each job with its own lock: a
  deferrer's ``batch_defer_async`` shares one lock); its worker with
  ``delete_jobs="always"`` (a finished job is deleted, as actors deletes an
  acknowledged message) and LISTEN/NOTIFY. It runs
  ``--procrastinate-messages`` (2,000: at 100-160 msg/s, 20,000 would take
  minutes a run; its rate was the same at 2,000 and 4,000 within the noise).
- ``pgqueuer_w1``, ``_w2`` (1.x, asyncpg driver): no per-key order (its best
  case); batch enqueue (lists); ``QueueManager.run(batch_size=200)``.

The peers run on uvloop (pgqueuer's own CLI does; procrastinate measured the
same on asyncio), with the settings the sweeps below the imports found best.
Their end is a count of their unfinished jobs every 10 ms, in each process,
tagged so that it stays out of their statement counts.

Per message, medians of interleaved rounds (min-max shown):

- **CPU µs** of the worker processes (each one's getrusage over its span,
  all threads) and of the PostgreSQL server (its whole process tree, from
  /proc, over the same span);
- **statements** (round trips: pg_stat_statements' calls in the span,
  BEGIN and COMMIT included), **COMMITs**, **write transactions** (the
  transaction ids taken in the span: a read-only statement takes none) and
  **WAL bytes**;
- for actors, its store's counters (group transactions, notices, looks),
  and its group transactions timed in their thread (how long, how much of
  it Python, how busy the committer was; pg_worker.Profiles).

``--profile DIR`` (or ``ACTORS_PG_PROFILE=DIR``) adds, after the rounds, one
cProfile'd run of ``actors_w2`` and of ``latency_w2``: each worker's trio
thread, and the store's thread around each group transaction; the .prof
files go to DIR (``python -m pstats``), their summary into the JSON.

Two diagnostics for the worker processes, off by default:
``ACTORS_PG_GROUPLOG=PREFIX`` writes each group transaction (start, wall,
CPU, the operations in it) to ``PREFIX-<worker>.json``;
``ACTORS_PG_SWITCHINTERVAL=S`` sets ``sys.setswitchinterval(S)`` (how long
the trio thread may hold the GIL while the store's thread waits for it).

The table goes to stdout; the JSON to ``--out`` (default
``benchmarks/results/pg-<timestamp>.json``), rewritten after every round;
``--report JSON`` prints the table of an earlier run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import pg_report
from benchmarks.pg_server import (
    Server,
    lifetime_stats,
    open_server,
    reset_statements,
    snapshot,
    statements,
)
from benchmarks.pg_worker import MARKER
from benchmarks.run import _git, _version, snapshot_code

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The runs that --profile repeats with cProfile, after the rounds.
PROFILED = ("actors_w2", "latency_w2")
PEER_VERSIONS = ("actors", "trio", "psycopg", "procrastinate", "pgqueuer", "asyncpg", "uvloop")


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # actors | latency | procrastinate | pgqueuer
    label: str
    workers: int
    params: dict[str, Any] = field(default_factory=dict)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pg",
        description="actors on PostgreSQL, end to end, against procrastinate and pgqueuer.",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--messages", type=int, default=20_000, help="messages per run (20,000)")
    p.add_argument("--sessions", type=int, default=100, help="keys (100)")
    p.add_argument("--batch", type=int, default=100, help="messages per send_many / enqueue")
    p.add_argument("--producers", type=int, default=4, help="sending tasks per process (4)")
    p.add_argument("--workers", default="1,2,4", help="actors worker processes (1,2,4)")
    p.add_argument("--peer-workers", default="1,2", help="peer worker processes (1,2)")
    p.add_argument("--peers", default="procrastinate,pgqueuer", help="peers to run ('' none)")
    p.add_argument(
        "--no-send-scenario",
        action="store_true",
        help="leave out actors_send_w2 (one send() per message from 100 tasks)",
    )
    p.add_argument("--latency-seconds", type=float, default=5.0, help="paced sends (5 s; 0: none)")
    p.add_argument(
        "--latency-fixed",
        type=float,
        default=1000,
        help="also latency at this fixed rate, msg/s (1,000; 0: none)",
    )
    p.add_argument("--lease-ttl", type=float, default=2.0, help="actors' lease_ttl (2 s)")
    p.add_argument("--buckets", type=int, default=1024, help="actors' buckets (1024)")
    p.add_argument(
        "--procrastinate-concurrency",
        type=int,
        default=None,
        help="its worker's concurrency (default: the best found)",
    )
    p.add_argument("--pgqueuer-batch", type=int, default=None, help="jobs per dequeue")
    p.add_argument(
        "--pgqueuer-driver", default=BEST_PGQUEUER_DRIVER, choices=("psycopg", "asyncpg")
    )
    p.add_argument(
        "--procrastinate-messages",
        type=int,
        default=PROCRASTINATE_MESSAGES,
        help=f"messages per procrastinate run ({PROCRASTINATE_MESSAGES:,})",
    )
    p.add_argument("--peer-loop", default="uvloop", choices=("uvloop", "asyncio"))
    p.add_argument("--server", default="durable", choices=("durable", "fast", "both"))
    p.add_argument("--only", default=None, help="comma-separated scenario names")
    p.add_argument(
        "--profile",
        default=os.environ.get("ACTORS_PG_PROFILE"),
        metavar="DIR",
        help="after the rounds, cProfile'd runs of actors_w2, latency_w2 to DIR",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON (default results/pg-*.json)")
    p.add_argument("--report", type=Path, default=None, help="print the table of a JSON")
    p.add_argument("--timeout", type=float, default=300, help="seconds per scenario run")
    return p.parse_args(argv)


# The peers' best settings on this machine (2 shared cores, PostgreSQL durable),
# from sweeps of single runs before the committed run (msg/s; the machine's
# noise between two runs of the same setting was up to 40%):
# - procrastinate, 2,000 messages with lock=key: concurrency 1/5/10/20/50 gave
#   89/99/95/94/100 with 1 process, 5/50 gave 150/163 with 2: its fetch
#   (one job per statement, ~8 ms of server time each with locks) decides,
#   not the concurrency. uvloop or asyncio: the same (114 with asyncio, 1 process).
# - pgqueuer, 20,000 messages, 2 processes: batch 100/200/500 gave
#   12,903-14,211/15,441-15,539/14,753-14,829 with asyncpg; 13,296 (100) and
#   8,006 (200) with psycopg, which also costs ~15 µs more worker CPU per
#   message; asyncio instead of uvloop: 7,015 against 7,345 (1 process, 100).
BEST_PROCRASTINATE_CONCURRENCY = 50
BEST_PGQUEUER_BATCH = 200
BEST_PGQUEUER_DRIVER = "asyncpg"
# procrastinate runs this many messages unless told (--procrastinate-messages):
# at ~100-160 msg/s, 20,000 would take two to three minutes a run.
PROCRASTINATE_MESSAGES = 2_000


def build(args: argparse.Namespace) -> list[Scenario]:
    common = {
        "messages": args.messages,
        "sessions": args.sessions,
        "batch": args.batch,
        "producers": args.producers,
    }
    actors = {**common, "lease_ttl": args.lease_ttl, "buckets": args.buckets}
    out = [
        Scenario(
            f"actors_w{w}",
            "actors",
            f"actors, {w} process(es), send_many",
            w,
            {**actors, "mode": "send_many"},
        )
        for w in _ints(args.workers)
    ]
    if not args.no_send_scenario:
        out.append(
            Scenario(
                "actors_send_w2",
                "actors",
                "actors, 2 processes, send() x100 tasks",
                2,
                {**actors, "mode": "send", "producers": 50},
            )
        )
    if args.latency_seconds > 0:
        # The figure: half of the end-to-end rate (send_many).
        out.append(
            Scenario(
                "latency_w2",
                "latency",
                "actors send() at half of actors_w2's msg/s, 2 processes",
                2,
                {**actors, "duration": args.latency_seconds, "base": "actors_w2"},
            )
        )
    if args.latency_seconds > 0 and not args.no_send_scenario:
        # Half of what the same producers sustain with one send() per
        # message: the load of the workload whose send() is timed.
        out.append(
            Scenario(
                "latency_send_w2",
                "latency",
                "actors send() at half of actors_send_w2's msg/s, 2 processes",
                2,
                {**actors, "duration": args.latency_seconds, "base": "actors_send_w2"},
            )
        )
    if args.latency_seconds > 0 and args.latency_fixed > 0:
        rate = args.latency_fixed
        out.append(
            Scenario(
                f"latency_{rate:g}_w2",
                "latency",
                f"actors send() at {rate:,g} msg/s, 2 processes",
                2,
                {**actors, "duration": args.latency_seconds, "rate": rate},
            )
        )
    peers = [p for p in args.peers.split(",") if p]
    conc = args.procrastinate_concurrency or BEST_PROCRASTINATE_CONCURRENCY
    batch = args.pgqueuer_batch or BEST_PGQUEUER_BATCH
    for w in _ints(args.peer_workers):
        if "procrastinate" in peers:
            out.append(
                Scenario(
                    f"procrastinate_w{w}",
                    "procrastinate",
                    f"procrastinate, lock=key, concurrency {conc}, {w} process(es),"
                    f" {args.procrastinate_messages:,} messages",
                    w,
                    {
                        **common,
                        "messages": args.procrastinate_messages,
                        "concurrency": conc,
                        "loop": args.peer_loop,
                    },
                )
            )
        if "pgqueuer" in peers:
            out.append(
                Scenario(
                    f"pgqueuer_w{w}",
                    "pgqueuer",
                    f"pgqueuer, no key order, batch {batch}, {w} process(es)",
                    w,
                    {
                        **common,
                        "batch_size": batch,
                        "driver": args.pgqueuer_driver,
                        "loop": args.peer_loop,
                    },
                )
            )
    if args.only:
        wanted = set(args.only.split(","))
        out = [s for s in out if s.name in wanted]
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


# -- worker processes -----------------------------------------------------------


class Worker:
    """One worker process and the lines it prints (read by a thread of its own)."""

    def __init__(self, spec: dict[str, Any], code: Path, log: Path, env: dict[str, str]) -> None:
        self.index = spec["index"]
        self._log = log
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.pg_worker", json.dumps(spec)],
            cwd=code,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str, deadline: float) -> dict[str, Any] | None:
        """Wait for the line ``word`` (or, for ``RESULT``, the result's JSON)."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"worker {self.index}: no {word} in time") from None
            if line is None:
                raise RuntimeError(f"worker {self.index} exited before {word}: {self.tail()}")
            if line.startswith(MARKER):
                result: dict[str, Any] = json.loads(line[len(MARKER) :])
                if "error" in result:
                    raise RuntimeError(f"worker {self.index}: {result['error']}: {self.tail()}")
                if word == "RESULT":
                    return result
                raise RuntimeError(f"worker {self.index}: a result before {word}")
            if line == word:
                return None

    def tail(self) -> str:
        self._stderr.flush()
        return self._log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()


def _wait_balanced(url: str, workers: int, buckets: int, deadline: float) -> dict[str, int]:
    """Wait until actors' buckets are spread evenly over ``workers`` live processes.

    Polled (every 100 ms) from outside: the workers are separate processes.
    Returns {member: buckets held}.
    """
    import psycopg

    share = math.ceil(buckets / workers)
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            rows = dict(
                conn.execute(
                    "SELECT owner, count(*) FROM actors_buckets WHERE owner IS NOT NULL"
                    " AND lease_until > now() GROUP BY owner"
                ).fetchall()
            )
            full = len(rows) == workers and sum(rows.values()) == buckets
            if full and max(rows.values()) <= share:
                return {str(k): int(v) for k, v in rows.items()}
            if time.monotonic() > deadline:
                raise RuntimeError(f"the buckets did not spread over {workers} processes: {rows}")
            time.sleep(0.1)


def _sessions_per_member(url: str, sessions: int, buckets: int) -> list[int]:
    """How many of the keys each process runs (the hash's spread), largest first."""
    import psycopg

    from actors.store.buckets import bucket_of

    with psycopg.connect(url, autocommit=True) as conn:
        owner = dict(conn.execute("SELECT bucket, owner FROM actors_buckets").fetchall())
    counts: dict[str, int] = {}
    for i in range(sessions):
        o = owner.get(bucket_of(f"s{i}", buckets))
        counts[str(o)] = counts.get(str(o), 0) + 1
    return sorted(counts.values(), reverse=True)


def _setup_peer(kind: str, url: str) -> None:
    """Create the peer's schema in the run's fresh database (its documented way)."""
    if kind == "procrastinate":
        import procrastinate

        async def apply() -> None:
            app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(apply())
    elif kind == "pgqueuer":
        import pgqueuer
        import psycopg

        async def install() -> None:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            try:
                await pgqueuer.Queries(pgqueuer.PsycopgDriver(conn)).install()
            finally:
                await conn.close()

        asyncio.run(install())


def run_scenario(
    server: Server,
    s: Scenario,
    code: Path,
    args: argparse.Namespace,
    tag: str,
    rate: float | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """One run of ``s`` on a fresh database: its figures (see the module)."""
    dbname = f"bench_{tag}_{s.name}"
    kind = "actors" if s.kind == "latency" else s.kind
    env = dict(os.environ)
    env.pop("ACTORS_PG_PROFILE", None)
    if profile:
        env["ACTORS_PG_PROFILE"] = profile
    deadline = time.monotonic() + args.timeout
    with server.database(dbname) as url, tempfile.TemporaryDirectory() as logs:
        _setup_peer(kind, url)
        life0 = lifetime_stats(server.url, dbname)
        workers: list[Worker] = []
        try:
            for i in range(s.workers):
                spec = {**s.params, "kind": kind, "url": url, "index": i, "workers": s.workers}
                if rate is not None:
                    spec["rate"] = rate
                workers.append(Worker(spec, code, Path(logs) / f"w{i}.log", env))
            for w in workers:
                w.expect("READY", deadline)
            extra: dict[str, Any] = {}
            if kind == "actors":
                held = _wait_balanced(url, s.workers, s.params["buckets"], deadline)
                extra["buckets_per_member"] = sorted(held.values(), reverse=True)
                extra["sessions_per_member"] = _sessions_per_member(
                    url, s.params["sessions"], s.params["buckets"]
                )
            counted = reset_statements(server.url)
            before = snapshot(server)
            for w in workers:
                w.say("GO")
            for w in workers:
                w.expect("SENT", deadline)
            for w in workers:
                w.say("ALLSENT")
            results = [w.expect("RESULT", deadline) for w in workers]
            after = snapshot(server)
            stmts = statements(server.url, dbname) if counted else None
            for w in workers:
                w.say("EXIT")
            for w in workers:
                w.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for w in workers:
                w.close()
        time.sleep(0.3)  # (the exited backends' statistics: flushed as they exit)
        life1 = lifetime_stats(server.url, dbname)
    assert all(r is not None for r in results)
    return pg_report.figures(
        s, [r for r in results if r], before, after, stmts, life0, life1, extra
    )


# -- the run ----------------------------------------------------------------------


def meta(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--", "actors")
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "messages": args.messages,
        "sessions": args.sessions,
        "git_commit": _git("rev-parse", "HEAD"),
        "actors_dirty": None if dirty is None else bool(dirty),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "server": {
            "version": server.version,
            "owned": server.owned,
            "cpu_visible": server.postmaster is not None,
            "fdatasync_8k_median_ms": _ms(server.fsync_probe()),
        },
        "settings": server.settings(),
        "versions": {d: _version(d) for d in PEER_VERSIONS},
        "peer_settings": {
            "procrastinate_concurrency": args.procrastinate_concurrency
            or BEST_PROCRASTINATE_CONCURRENCY,
            "pgqueuer_batch": args.pgqueuer_batch or BEST_PGQUEUER_BATCH,
            "pgqueuer_driver": args.pgqueuer_driver,
            "peer_loop": args.peer_loop,
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 4)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report is not None:
        print(pg_report.table(json.loads(args.report.read_text())))
        return 0
    scenarios = build(args)
    if not scenarios:
        _progress("no scenario selected")
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"pg-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    server = open_server()
    try:
        if server.owned:
            server.use("fast" if args.server == "fast" else "durable")
        with tempfile.TemporaryDirectory(prefix="actors-bench-code-") as code:
            info = meta(args, server)
            info["actors_source_sha256"] = snapshot_code(Path(code))
            doc = _rounds(args, scenarios, server, Path(code), info, out)
    finally:
        server.stop()
    print(pg_report.table(doc))
    print(f"\nJSON: {out}")
    return 1 if any("error" in r for e in doc["scenarios"].values() for r in e["rounds"]) else 0


def _rounds(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    server: Server,
    code: Path,
    info: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    profiles = ["durable", "fast"] if args.server == "both" else [args.server]
    names = [(p, s) for p in profiles for s in scenarios]
    rounds: dict[str, list[dict[str, Any]]] = {_key(p, s, args): [] for p, s in names}
    begin = time.monotonic()
    doc: dict[str, Any] = {}
    for r in range(1, args.rounds + 1):
        for profile, s in names:
            if server.owned and server.profile != profile:
                server.use(profile)
            key = _key(profile, s, args)
            rate = _rate(rounds, s, scenarios, args, profile)
            if s.kind == "latency" and rate is None:
                rounds[key].append({"error": f"no {s.params['base']} figure to set the rate"})
                continue
            t0 = time.monotonic()
            try:
                result = run_scenario(server, s, code, args, f"r{r}", rate)
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["wall_s"] = round(time.monotonic() - t0, 2)
            result["loadavg"] = os.getloadavg()[0]
            rounds[key].append(result)
            _progress(f"[round {r}/{args.rounds}] {key:<28} {pg_report.brief(result)}")
        doc = pg_report.document(info, names, rounds, begin, args)
        _write(out, doc)
    if args.profile:
        doc["profile"] = {}
        for s in scenarios:
            if s.name not in PROFILED:
                continue
            rate = _rate(rounds, s, scenarios, args, profiles[0])
            _progress(f"[profile] {s.name} with cProfile -> {args.profile}")
            try:
                result = run_scenario(server, s, code, args, "prof", rate, profile=args.profile)
                _progress(f"[profile] {s.name:<28} {pg_report.brief(result)}")
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            doc["profile"][s.name] = result
        _write(out, doc)
    return doc


def _rate(
    rounds: dict[str, list[dict[str, Any]]],
    s: Scenario,
    scenarios: list[Scenario],
    args: argparse.Namespace,
    profile: str,
) -> float | None:
    """The offered rate of a latency scenario: half the median msg/s of its base so far."""
    if s.kind != "latency":
        return None
    if "rate" in s.params:
        return float(s.params["rate"])
    base = next((x for x in scenarios if x.name == s.params["base"]), None)
    if base is None:
        raise SystemExit(f"{s.name} needs {s.params['base']} (--only)")
    done = [x["msg_per_s"] for x in rounds.get(_key(profile, base, args), []) if "msg_per_s" in x]
    return statistics.median(done) / 2 if done else None


def _key(profile: str, s: Scenario, args: argparse.Namespace) -> str:
    return s.name if args.server != "both" else f"{s.name}@{profile}"


def _write(out: Path, doc: dict[str, Any]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    raise SystemExit(main())
