"""One worker process of ``python -m benchmarks.pg``: ``python -m benchmarks.pg_worker '<json>'``.

The argument is ``{"kind": ..., "url": ..., "index": i, "workers": W, ...}``
(see pg.py for the fields). The process talks to the runner in lines:

- it prints ``READY`` once it is up (connected, schema made, its worker
  running and idle), and waits for ``GO``;
- at ``GO`` it starts its clock and CPU counters and sends its share of the
  messages (message ``k`` for ``k % W == i``, to session ``k % sessions``,
  so every process sends to every session and most sends cross processes);
  it prints ``SENT`` when every one of its sends returned, and waits for
  ``ALLSENT`` (every process's sends are durable);
- then it waits until the whole database is drained (``system.drain()`` for
  actors; a count of the peer's unfinished jobs every 10 ms for the peers),
  stops its clock and counters, prints ``BENCH-RESULT <json>``, and waits
  for ``EXIT``.

The barrier before draining matters for the CPU figures: a process that
drained before another had sent would stop counting while it still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import os
import queue
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

MARKER = "BENCH-RESULT "
# The peers' drain checks are the harness's, not the peer's: the runner
# leaves the statements tagged so out of the peer's counts.
DRAIN_TAG = "/* bench-drain */ "
_lines: queue.SimpleQueue[str] = queue.SimpleQueue()


def _read_stdin() -> None:
    for line in sys.stdin:
        _lines.put(line.strip())
    _lines.put("EOF")


def _say(text: str) -> None:
    print(text, flush=True)


def wait_for(word: str) -> None:
    """Block until the runner says ``word`` (in a thread: the loop runs meanwhile)."""
    line = _lines.get()
    if line != word:
        raise RuntimeError(f"expected {word!r} from the runner, got {line!r}")


def _cpu() -> float:
    """CPU seconds of this process so far, every thread, user and system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far by thread name (``/proc/self/task/*/comm``; the main thread: main).

    Clock-tick resolution (10 ms): meaningful over spans of seconds.
    """
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    pid = os.getpid()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue  # the thread ended meanwhile
        if int(tid) == pid:
            name = "main"
        seconds = (int(fields[11]) + int(fields[12])) / tick
        out[name] = out.get(name, 0.0) + seconds
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v - before.get(k, 0.0)}


class Span:
    """Wall clock and CPU of this process between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.t0 = self.t1 = self.sent_at = 0.0
        self.cpu0 = self.cpu1 = 0.0
        self.threads0: dict[str, float] = {}
        self.threads1: dict[str, float] = {}

    def start(self) -> None:
        self.threads0 = thread_cpu()
        self.cpu0 = _cpu()
        self.t0 = time.monotonic()

    def sent(self) -> None:
        self.sent_at = time.monotonic()

    def stop(self) -> None:
        self.t1 = time.monotonic()
        self.cpu1 = _cpu()
        self.threads1 = thread_cpu()

    def figures(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "t_sent": self.sent_at,
            "t1": self.t1,
            "cpu_s": self.cpu1 - self.cpu0,
            "threads_cpu_s": _delta(self.threads1, self.threads0),
        }


def my_share(spec: dict[str, Any]) -> list[int]:
    return list(range(spec["index"], spec["messages"], spec["workers"]))


def sessions_of(spec: dict[str, Any]) -> list[str]:
    return [f"s{i}" for i in range(spec["sessions"])]


def chunks(items: list[int], size: int, producers: int) -> list[list[list[int]]]:
    """``items`` in batches of ``size``, dealt round-robin to ``producers`` tasks."""
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    return [batches[j::producers] for j in range(producers)]


# -- profiling (ACTORS_PG_PROFILE=<dir>) -------------------------------------------


class Profiles:
    """The store's group transactions timed, and cProfile if asked (``ACTORS_PG_PROFILE``).

    Every group transaction runs in a worker thread, in
    ``Committer._run_group_waiting``: a wrapper times each call there, wall
    clock and the thread's CPU (the difference is waiting: for the server's
    answers and its fsync, and for the GIL), with the number of operations
    in the group. Always on during the span (four clock reads per group,
    which is tens of milliseconds): the only change to the code measured.
    With a profile directory, cProfile also runs on the trio thread over the
    span and, switched on around each group, on the store's thread (two
    ``.prof`` files per process). ``ACTORS_PG_GROUPLOG=PREFIX``: every group
    (start, wall, CPU, its operations' names) to ``PREFIX-<tag>.json``.
    """

    def __init__(self, directory: str | None, tag: str) -> None:
        self.directory = directory
        self.tag = tag
        self.main = cProfile.Profile() if directory else None
        self.store = cProfile.Profile() if directory else None
        self.active = False
        self.groups: list[tuple[float, float, int]] = []  # (wall s, cpu s, operations)
        self.log: list[Any] | None = [] if os.environ.get("ACTORS_PG_GROUPLOG") else None

    def wrap_committer(self) -> None:
        from actors.store import committer

        original = committer.Committer._run_group_waiting
        profiles = self

        def timed(self: Any, group: Any, isolate: bool) -> None:
            if not profiles.active:
                return original(self, group, isolate)
            prof = profiles.store
            w0, c0 = time.perf_counter(), time.thread_time()
            if prof is not None:
                prof.enable()
            try:
                return original(self, group, isolate)
            finally:
                if prof is not None:
                    prof.disable()
                cpu = time.thread_time() - c0
                profiles.groups.append((time.perf_counter() - w0, cpu, len(group)))
                if profiles.log is not None:
                    names = [getattr(op.fn, "__name__", "?") for op in group]
                    profiles.log.append((w0, time.perf_counter() - w0, cpu, names))

        committer.Committer._run_group_waiting = timed  # type: ignore[method-assign]

    def start(self) -> None:
        self.active = True
        if self.main is not None:
            self.main.enable()

    def stop(self) -> dict[str, Any]:
        self.active = False
        walls = sorted(g[0] for g in self.groups)
        out: dict[str, Any] = {
            "store_groups": len(self.groups),
            "store_group_wall_s": sum(walls),
            "store_group_cpu_s": sum(g[1] for g in self.groups),
            "store_group_ops": sum(g[2] for g in self.groups),
            "store_group_ms": [round(w * 1e3, 3) for w in walls],
        }
        if self.log is not None:
            with open(f"{os.environ['ACTORS_PG_GROUPLOG']}-{self.tag}.json", "w") as f:
                json.dump(self.log, f)
        if self.main is None or self.directory is None:
            return out
        self.main.disable()
        os.makedirs(self.directory, exist_ok=True)
        paths = {}
        for name, prof in (("main", self.main), ("store", self.store)):
            assert prof is not None
            path = os.path.join(self.directory, f"{self.tag}-{name}.prof")
            prof.dump_stats(path)
            paths[name] = path
        out["profiles"] = paths
        return out


# -- actors --------------------------------------------------------------------


def run_actors(spec: dict[str, Any]) -> dict[str, Any]:
    import trio

    what = "latency" if spec.get("rate") else "throughput"
    profiles = Profiles(os.environ.get("ACTORS_PG_PROFILE"), f"actors-{what}-w{spec['index']}")
    profiles.wrap_committer()
    if spec.get("rate"):
        return trio.run(_actors_latency, spec, profiles)
    return trio.run(_actors_throughput, spec, profiles)


def _cluster_figures(system: Any) -> dict[str, Any]:
    """What the store and the cluster counted (statistics() of the store and the cluster)."""
    store = system._store  # (the benchmark's only look past the public API: counters)
    st = store.statistics()
    cl = store.cluster.statistics()
    return {
        "commits": st.transactions,
        "operations": st.operations,
        "largest_group": st.largest_group,
        "rounds": cl.rounds,
        "notices": cl.notices,
        "looks": cl.looks,
        "owned": cl.owned,
        "fenced_writes": cl.fenced_writes,
    }


def _minus(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    keep = ("owned", "largest_group")
    return {k: (v if k in keep else v - before[k]) for k, v in after.items()}


async def _actors_throughput(spec: dict[str, Any], profiles: Profiles) -> dict[str, Any]:
    import trio

    import actors

    sessions = sessions_of(spec)
    n_sessions = len(sessions)
    mine = my_share(spec)
    handled = 0

    async def noop(ctx: actors.Context, msg: actors.Message) -> None:
        nonlocal handled
        handled += 1

    async def produce(batches: list[list[int]], system: actors.System) -> None:
        if spec["mode"] == "send":
            for batch in batches:
                for k in batch:
                    await system.send(sessions[k % n_sessions], {"n": k})
            return
        for batch in batches:
            await system.send_many((sessions[k % n_sessions], {"n": k}) for k in batch)

    span = Span()
    async with actors.run_system(
        spec["url"], handler=noop, lease_ttl=spec["lease_ttl"], buckets=spec["buckets"]
    ) as system:
        _say("READY")
        await trio.to_thread.run_sync(wait_for, "GO")
        before = _cluster_figures(system)
        stats0 = system.statistics()
        profiles.start()
        span.start()
        # send(): messages dealt one by one to the tasks, each awaiting its sends in turn.
        size = spec["batch"] if spec["mode"] == "send_many" else 1
        async with trio.open_nursery() as nursery:
            for batches in chunks(mine, size, spec["producers"]):
                nursery.start_soon(produce, batches, system)
        span.sent()
        _say("SENT")
        await trio.to_thread.run_sync(wait_for, "ALLSENT")
        await system.drain()
        span.stop()
        extra = profiles.stop()
        after = _cluster_figures(system)
        stats1 = system.statistics()
        result = {
            **span.figures(),
            **extra,
            "handled": handled,
            "sent": len(mine),
            "processed_db": stats1.processed - stats0.processed,
            "store": _minus(after, before),
        }
        _say(MARKER + json.dumps(result))
        await trio.to_thread.run_sync(wait_for, "EXIT")
    return result


async def _actors_latency(spec: dict[str, Any], profiles: Profiles) -> dict[str, Any]:
    """Paced send() at ``rate / workers`` msg/s from this process (e2e._Senders)."""
    import trio

    import actors
    from benchmarks.e2e import _percentile, _Senders

    sessions = sessions_of(spec)
    starts: list[float] = []
    perf = time.perf_counter

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        t = msg.body.get("t")
        if t is not None:
            # (perf_counter is CLOCK_MONOTONIC: one clock for every process of the host.)
            starts.append(perf() - t)

    rate = spec["rate"] / spec["workers"]
    before: dict[str, Any] = {}
    n = max(100, int(rate * spec["duration"]))
    span = Span()
    async with actors.run_system(
        spec["url"], handler=handle, lease_ttl=spec["lease_ttl"], buckets=spec["buckets"]
    ) as system:

        async def send(session: str, body: dict[str, Any]) -> int:
            return await system.send(session, {"n": body["n"], "t": perf()})

        # Every session has a live actor before the clock starts.
        await system.send_many((s, {"warm": True}) for s in sessions)
        await system.drain()
        _say("READY")
        await trio.to_thread.run_sync(wait_for, "GO")
        before = _cluster_figures(system)
        profiles.start()
        span.start()
        senders = _Senders(send, sessions)
        due = await senders.run(rate, n)
        span.sent()
        _say("SENT")
        await trio.to_thread.run_sync(wait_for, "ALLSENT")
        await system.drain()
        span.stop()
        extra = profiles.stop()
        call, ret = senders.call, senders.ret
        send_ms = sorted((r - c) * 1e3 for c, r in zip(call, ret, strict=True))
        lag_ms = sorted((c - d) * 1e3 for d, c in zip(due, call, strict=True))
        result = {
            **span.figures(),
            **extra,
            "sent": n,
            "handled": len(starts),
            "offered_rate": rate,
            "achieved_rate": (n - 1) / (max(call) - min(call)),
            # Raw samples, merged by the runner (ms, rounded to the µs).
            "send_ms": [round(x, 3) for x in send_ms],
            "start_ms": [round(x * 1e3, 3) for x in starts],
            "pacing_lag_p99_ms": _percentile(lag_ms, 99),
            "store": _minus(_cluster_figures(system), before),
        }
        _say(MARKER + json.dumps(result))
        await trio.to_thread.run_sync(wait_for, "EXIT")
    return result


# -- the peers (asyncio) -----------------------------------------------------------


async def _drained(count: Callable[[], Any]) -> None:
    """Poll the peer's count of unfinished jobs until it is 0, every 10 ms (the
    jobs are finished in other processes too: no event here can say so)."""
    while await count():  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def _run_asyncio(main: Callable[[], Any], loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def run_procrastinate(spec: dict[str, Any]) -> dict[str, Any]:
    import procrastinate

    concurrency: int = spec["concurrency"]
    connector = procrastinate.PsycopgConnector(
        conninfo=spec["url"],
        # A connection for each job in flight, the listener and the producers.
        min_size=2,
        max_size=concurrency + spec["producers"] + 2,
    )
    app = procrastinate.App(connector=connector)
    handled = 0

    @app.task(name="noop")
    async def noop(n: int) -> None:
        nonlocal handled
        handled += 1

    sessions = sessions_of(spec)
    mine = my_share(spec)
    locks = spec.get("locks", True)

    async def produce(batches: list[list[int]]) -> None:
        # The job manager's batch defer: one statement per batch, each job
        # with its own lock (a deferrer's batch_defer_async shares one lock).
        for batch in batches:
            jobs = [
                noop.configure(lock=sessions[k % len(sessions)] if locks else None).make_new_job(
                    n=k
                )
                for k in batch
            ]
            await app.job_manager.batch_defer_jobs_async(jobs=jobs)

    async def unfinished() -> int:
        row = await connector.execute_query_one_async(
            DRAIN_TAG
            + "SELECT count(*) AS c FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        )
        return int(row["c"])

    async def main() -> dict[str, Any]:
        span = Span()
        async with app.open_async():
            worker = asyncio.create_task(
                app.run_worker_async(
                    concurrency=concurrency,
                    wait=True,
                    delete_jobs="always",
                    install_signal_handlers=False,
                    listen_notify=True,
                )
            )
            await asyncio.sleep(0.5)  # (the worker registered and listens)
            _say("READY")
            await asyncio.to_thread(wait_for, "GO")
            span.start()
            await asyncio.gather(
                *(produce(b) for b in chunks(mine, spec["batch"], spec["producers"]))
            )
            span.sent()
            _say("SENT")
            await asyncio.to_thread(wait_for, "ALLSENT")
            await _drained(unfinished)
            span.stop()
            result = {**span.figures(), "handled": handled, "sent": len(mine)}
            _say(MARKER + json.dumps(result))
            await asyncio.to_thread(wait_for, "EXIT")
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        return result

    return _run_asyncio(main, spec["loop"])  # type: ignore[no-any-return]


def run_pgqueuer(spec: dict[str, Any]) -> dict[str, Any]:
    from datetime import timedelta

    import pgqueuer
    from pgqueuer.domain.types import QueueExecutionMode

    sessions = sessions_of(spec)
    mine = my_share(spec)
    handled = 0

    async def connect() -> Any:
        if spec["driver"] == "asyncpg":
            import asyncpg

            conn = await asyncpg.connect(spec["url"])
            return conn, pgqueuer.AsyncpgDriver(conn)
        import psycopg

        conn = await psycopg.AsyncConnection.connect(spec["url"], autocommit=True)
        return conn, pgqueuer.PsycopgDriver(conn)

    async def main() -> dict[str, Any]:
        nonlocal handled
        span = Span()
        conn, driver = await connect()
        qm = pgqueuer.QueueManager(pgqueuer.Queries(driver))

        @qm.entrypoint("noop")
        async def noop(job: pgqueuer.Job) -> None:
            nonlocal handled
            handled += 1

        # The producers and the drain check on connections of their own:
        # the queue manager's connection is busy with its dequeues.
        pconn, pdriver = await connect()
        producer = pgqueuer.Queries(pdriver)
        runner = asyncio.create_task(
            qm.run(
                batch_size=spec["batch_size"],
                mode=QueueExecutionMode.continuous,
                dequeue_timeout=timedelta(seconds=5),
            )
        )
        await asyncio.sleep(0.5)  # (listening)
        _say("READY")
        await asyncio.to_thread(wait_for, "GO")
        span.start()
        lock = asyncio.Lock()  # (one connection: one statement at a time)

        async def produce(batches: list[list[int]]) -> None:
            for batch in batches:
                payloads = [
                    json.dumps({"s": sessions[k % len(sessions)], "n": k}).encode() for k in batch
                ]
                async with lock:
                    await producer.enqueue(["noop"] * len(batch), payloads, [0] * len(batch))

        await asyncio.gather(*(produce(b) for b in chunks(mine, spec["batch"], spec["producers"])))
        span.sent()
        _say("SENT")
        await asyncio.to_thread(wait_for, "ALLSENT")

        async def unfinished() -> int:
            async with lock:
                rows = await pdriver.fetch(DRAIN_TAG + "SELECT count(*) AS c FROM pgqueuer")
            return int(rows[0]["c"])

        await _drained(unfinished)
        span.stop()
        result = {**span.figures(), "handled": handled, "sent": len(mine)}
        _say(MARKER + json.dumps(result))
        await asyncio.to_thread(wait_for, "EXIT")
        qm.shutdown.set()
        await runner
        await pconn.close()
        await conn.close()
        return result

    return _run_asyncio(main, spec["loop"])  # type: ignore[no-any-return]


KINDS = {"actors": run_actors, "procrastinate": run_procrastinate, "pgqueuer": run_pgqueuer}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    # A diagnostic: how long the trio thread may keep the GIL while the
    # store's thread waits for it (Python's default: 5 ms).
    if os.environ.get("ACTORS_PG_SWITCHINTERVAL"):
        sys.setswitchinterval(float(os.environ["ACTORS_PG_SWITCHINTERVAL"]))
    threading.Thread(target=_read_stdin, name="bench-stdin", daemon=True).start()
    try:
        KINDS[spec["kind"]](spec)
    except BaseException as exc:
        traceback.print_exc()
        _say(MARKER + json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
