"""``actors`` end to end: send -> durable -> handler -> ack, with a no-op handler.

Only the public API: ``run_system``, ``send``, ``send_many``, ``drain``,
``statistics``. Opening and closing the system are outside the measured
span; the span runs from the first send to the end of ``drain()``, so every
message was persisted, handled and acknowledged inside it.
"""

from __future__ import annotations

import gc
import math
import os
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio

import actors
from actors.store.committer import idle_waiter as _idle_waiter

# trio.testing's, without importing trio.testing: it imports pytest, whose
# ~12,000 tracked objects would lengthen every full GC collection of the
# process measured (no program that uses actors carries them).
_wait_all_tasks_blocked = _idle_waiter()


def _rss_mb() -> float:
    """Resident memory of this process now, in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def _thread_cpu() -> tuple[float, float]:
    """CPU seconds so far of (this thread, the other threads of the process), from /proc.

    The main thread runs the trio loop, and with it the store's
    transactions; the others are the store's sync thread (durability
    "full": the COMMIT and its fsync) and worker threads. Clock-tick
    resolution (10 ms), so use it over spans of seconds. (0, 0) where /proc
    is missing.
    """
    main = other = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pid = os.getpid()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if int(tid) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


def _options(params: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"durability": params["durability"]}
    if "idle_timeout" in params:
        options["idle_timeout"] = params["idle_timeout"]
    return options


async def _noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def _noop_batch(ctx: actors.Context, msgs: list[actors.Message]) -> None:
    pass


def _handler(params: dict[str, Any]) -> Any:
    """The no-op handler of a scenario: one message at a time, or batched."""
    size = params.get("batched")
    return _noop if size is None else actors.batched(max_size=size)(_noop_batch)


async def _make_idle(system: actors.System, count: int) -> float:
    """Give ``count`` sessions one message each, then wait until all are passivated."""
    t0 = time.perf_counter()
    chunk = 10_000
    for first in range(0, count, chunk):
        await system.send_many(
            (f"idle-{i}", {"n": i}) for i in range(first, min(first + chunk, count))
        )
    await system.drain()
    deadline = trio.current_time() + 120
    while trio.current_time() < deadline:
        if system.statistics().active_actors == 0:
            break
        await trio.sleep(0.05)
    else:
        raise AssertionError("idle sessions were not passivated within 120 s")
    return time.perf_counter() - t0


async def _throughput(
    params: dict[str, Any], path: str, mark: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One throughput run; ``mark("start")`` and ``mark("end")`` bound its measured span
    (benchmarks/store_sql.py records the store's statements inside it)."""
    sessions = [f"s{i}" for i in range(params["sessions"])]
    n_sessions = len(sessions)
    total = n_sessions * params["per_session"]
    producers: int = params["producers"]
    idle: int = params.get("idle_sessions", 0)
    result: dict[str, Any] = {}

    async def send_all(system: actors.System, j: int) -> None:
        send = system.send
        for k in range(j, total, producers):
            await send(sessions[k % n_sessions], {"n": k})

    async def send_batches(system: actors.System, j: int) -> None:
        size: int = params["batch"]
        for first in range(j * size, total, producers * size):
            await system.send_many(
                (sessions[k % n_sessions], {"n": k}) for k in range(first, min(first + size, total))
            )

    producer = send_all if params["mode"] == "send" else send_batches
    async with actors.run_system(path, handler=_handler(params), **_options(params)) as system:
        if idle:
            result["idle_setup_s"] = await _make_idle(system, idle)
            result["rss_idle_mb"] = _rss_mb()
        before = system.statistics()
        gc.collect()
        threads0 = _thread_cpu()
        if mark is not None:
            mark("start")
        c0 = time.process_time()
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for j in range(producers):
                nursery.start_soon(producer, system, j)
        await system.drain()
        elapsed = time.perf_counter() - t0
        if mark is not None:
            mark("end")
        cpu = time.process_time() - c0
        threads1 = _thread_cpu()
        after = system.statistics()
        result["rss_mb"] = _rss_mb()
    processed = after.processed - before.processed
    if processed != total:
        raise AssertionError(f"processed {processed} messages, expected {total}")
    commits = after.commits - before.commits
    result.update(
        messages=total,
        elapsed_s=elapsed,
        msg_per_s=total / elapsed,
        cpu_us_per_msg=cpu / total * 1e6,
        cpu_loop_us_per_msg=(threads1[0] - threads0[0]) / total * 1e6,
        # (The other threads; the key is named for the writer thread it once was.)
        cpu_store_us_per_msg=(threads1[1] - threads0[1]) / total * 1e6,
        msgs_per_commit=total / commits if commits else None,
    )
    return result


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)]


WORKERS = 256  # sender tasks of the latency scenario (each has one send() in flight)
# The pacer sleeps at least this long, then releases every message due by
# then. Waking for each message (every 33 us at 30k msg/s) cut trio's loop
# into iterations of one task each: the harness alone, against a system that
# does nothing, kept the loop 91-93% busy at 30k msg/s; 31% with this tick.
# (trio's sleeps end on epoll's millisecond timeouts anyway.)
TICK = 0.0005


class _LoopBusy(trio.abc.Instrument):
    """Time the trio loop spends waiting for I/O (idle), to report its busy share."""

    def __init__(self) -> None:
        self.idle = 0.0
        self._since = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._since = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        self.idle += time.perf_counter() - self._since


class _GcPauses:
    """Python's garbage collections during a span: how many full ones, the longest pause.

    A full collection (generation 2) walks every tracked object (about 45,000
    here, most of them the imported modules' functions and types) with the
    loop stopped: 13 ms at rest, 25-40 ms when a backlog has built up. It
    runs when enough objects have survived younger collections, which is
    when messages pile up: so it comes with the rounds that fell behind, and
    makes them worse. Reported so that a slow round can be told apart.
    """

    def __init__(self) -> None:
        self.full = 0
        self.longest_ms = 0.0
        self._started = 0.0

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._started) * 1e3)
        if info["generation"] == 2:
            self.full += 1


class _Senders:
    """The latency harness: a pool of sender tasks fed by a pacer, open loop.

    ``post(k)`` hands message ``k`` to an idle sender (one reschedule, no
    channel), or queues it if all are busy: a slow send does not delay the
    next ones while a sender is free, so no coordinated omission; when all
    are busy, the wait shows as pacing lag (due -> call).
    """

    def __init__(self, send: Callable[[str, Any], Awaitable[Any]], sessions: list[str]) -> None:
        self._send = send
        self._sessions = sessions
        self._idle: list[trio.lowlevel.Task] = []
        self._backlog: deque[int] = deque()
        self.call: array[float] = _floats(0)
        self.ret: array[float] = _floats(0)

    def post(self, k: int | None) -> None:
        if self._idle:
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(k))
        else:
            self._backlog.append(k)

    async def worker(self) -> None:
        send, sessions, perf = self._send, self._sessions, time.perf_counter
        n_sessions = len(sessions)
        call, ret = self.call, self.ret
        while True:
            if self._backlog:
                k = self._backlog.popleft()
            else:
                self._idle.append(trio.lowlevel.current_task())
                k = await trio.lowlevel.wait_task_rescheduled(_abort_idle)
            if k is None:  # (run() posts one None per sender at the end)
                return
            call[k] = perf()
            await send(sessions[k % n_sessions], {"n": k})
            ret[k] = perf()

    async def run(self, rate: float, n: int) -> array[float]:
        """Offer ``n`` messages at ``rate`` msg/s; returns when all were sent (their due times)."""
        self.call, self.ret = _floats(n), _floats(n)
        due = _floats(n)
        perf = time.perf_counter
        async with trio.open_nursery() as nursery:
            for _ in range(WORKERS):
                nursery.start_soon(self.worker)
            await _wait_all_tasks_blocked()
            base = perf() + 0.001
            k = 0
            while k < n:
                now = perf()
                ahead = base + k / rate - now
                if ahead > 0:
                    await trio.sleep(max(ahead, TICK))
                    continue
                while k < n and base + k / rate <= now:
                    due[k] = base + k / rate
                    self.post(k)
                    k += 1
                await trio.lowlevel.checkpoint()
            for _ in range(WORKERS):
                self.post(None)
        return due


def _floats(n: int) -> array[float]:
    """``n`` zeros in an array of doubles: a timestamp per message, and no
    object per entry. (Lists of floats are traversed by every full GC
    collection: four of them, a run's length each, lengthened the pauses
    the latency scenario measures, and that only ``gc.freeze()`` hid.)
    """
    return array("d", bytes(8 * n))


def _abort_idle(_: object) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


class _NullSystem:
    """A stand-in whose ``send()`` commits every 2 ms or when the loop is idle, and does nothing.

    Running the harness against it measures the harness's own share of the loop.
    """

    def __init__(self) -> None:
        self._waiting: list[trio.lowlevel.Task] = []
        self._work = trio.Event()

    async def send(self, session_id: str, body: Any) -> None:
        self._waiting.append(trio.lowlevel.current_task())
        self._work.set()
        await trio.lowlevel.wait_task_rescheduled(_abort_idle)

    async def commit_loop(self) -> None:
        while True:
            if not self._waiting:
                self._work = trio.Event()
                await self._work.wait()
                continue
            with trio.move_on_after(0.002):  # as the store's committer does
                await _wait_all_tasks_blocked()
            waiting, self._waiting = self._waiting, []
            for task in waiting:
                trio.lowlevel.reschedule(task)


async def _latency(params: dict[str, Any], path: str, busy: _LoopBusy) -> dict[str, Any]:
    """Offer ``rate`` msg/s on a fixed schedule; time each send and each handler start.

    The pacer (``_Senders``) releases each message when its time comes, at
    most every ``TICK``, to a pool of ``WORKERS`` sender tasks. Timestamps
    are ``time.perf_counter()``: ``call`` just before ``send()``, ``ret``
    when it returns, ``start`` when the handler starts. The loop's busy share
    is measured over the run, and first, for one second, with the same
    harness against a system that does nothing (``_NullSystem``): the
    harness's own share. With ``gc_freeze``, ``gc.freeze()`` runs once the
    system is up (the recipe docs/howto-tuning.md describes, and measures).
    """
    rate: float = params["rate"]
    sessions = [f"s{i}" for i in range(params["sessions"])]
    n = max(100, int(rate * params["duration"]))
    start = _floats(n)
    perf = time.perf_counter

    null = _NullSystem()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(null.commit_loop)
        t0, idle0 = perf(), busy.idle
        await _Senders(null.send, sessions).run(rate, max(100, int(rate)))
        harness_busy = 1 - (busy.idle - idle0) / (perf() - t0)
        nursery.cancel_scope.cancel()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        k = msg.body.get("n")
        if k is not None:
            start[k] = perf()

    async with actors.run_system(path, handler=handle, **_options(params)) as system:
        # Warm up: every session has a live actor before the clock starts.
        await system.send_many((s, {"warm": True}) for s in sessions)
        await system.drain()
        gc.collect()
        if params.get("gc_freeze"):
            gc.freeze()  # (the recipe of docs/howto-tuning.md)
        c0 = time.process_time()
        t0, idle0 = perf(), busy.idle
        senders = _Senders(system.send, sessions)
        with _GcPauses() as pauses:
            due = await senders.run(rate, n)
            await system.drain()
        loop_busy = 1 - (busy.idle - idle0) / (perf() - t0)
        cpu = time.process_time() - c0
    call, ret = senders.call, senders.ret

    send_ms = sorted((r - c) * 1e3 for c, r in zip(call, ret, strict=True))
    start_ms = sorted((s - c) * 1e3 for c, s in zip(call, start, strict=True))
    lag_ms = sorted((c - d) * 1e3 for d, c in zip(due, call, strict=True))
    if start_ms[0] < 0:
        raise AssertionError("a handler start was not recorded")
    return {
        "messages": n,
        "offered_rate": rate,
        "achieved_rate": (n - 1) / (max(call) - min(call)),
        "send_p50_ms": _percentile(send_ms, 50),
        "send_p99_ms": _percentile(send_ms, 99),
        "send_max_ms": send_ms[-1],
        "start_p50_ms": _percentile(start_ms, 50),
        "start_p99_ms": _percentile(start_ms, 99),
        "start_max_ms": start_ms[-1],
        "pacing_lag_p99_ms": _percentile(lag_ms, 99),
        "cpu_us_per_msg": cpu / n * 1e6,
        "loop_busy": loop_busy,
        "harness_loop_busy": harness_busy,
        "gc_full_collections": pauses.full,
        "gc_longest_pause_ms": pauses.longest_ms,
    }


def run_throughput(
    params: dict[str, Any], path: str, mark: Callable[[str], None] | None = None
) -> dict[str, Any]:
    return trio.run(_throughput, params, path, mark)


def run_latency(params: dict[str, Any], path: str) -> dict[str, Any]:
    busy = _LoopBusy()
    return trio.run(_latency, params, path, busy, instruments=[busy])
