"""``actors demo`` (also ``python -m actors demo``): a chaos workload that checks its own result.

Many sessions send concurrently into a system on a local SQLite file. The
handler sleeps a few milliseconds, sometimes raises, rarely hangs past
``handler_timeout``, and always fails on "poison" messages; a chaos task
kills random busy actors mid-message. When everything has drained, the demo
compares what ``send()`` acknowledged with what the handler completed and
what sits in dead letters, and prints the verdict as a table.

The handler's own record is the ground truth: a message counts as processed
only if a handler call for it returned normally. Only the public API is used
(and, after a stop by a signal, a read of the database for what is left).

SIGTERM or SIGINT (Ctrl-C) stops the run gracefully (``System.shutdown``):
nothing new starts, running handlers finish, their acks commit, and what is
left stays pending in the database for the next run (``--db``); the
verification then counts it as left, not lost. A second signal stops at
once (running handlers are cancelled, their messages run again next time).
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from itertools import pairwise

import apsw
import attrs
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

import actors


@attrs.frozen(kw_only=True)
class DemoOptions:
    """The knobs of the demo (the command line sets them)."""

    db: str | None = None  # None: a fresh file in a temporary directory
    sessions: int = 500
    messages: int = 20  # per session
    seed: int | None = None
    fail_rate: float = 0.05  # chance that an attempt raises
    poison_rate: float = 0.004  # chance that a message fails on every attempt
    hang_rate: float = 0.002  # chance that an attempt outlives handler_timeout
    kill_interval: float = 0.01  # mean seconds between kill attempts
    latency: tuple[float, float] = (0.001, 0.005)  # handler sleep range, seconds
    progress_interval: float = 0.5
    timeout: float = 60.0  # give up waiting for drain() after this long


STOP_GRACE = 5.0  # seconds running handlers get after SIGTERM / SIGINT (handler_timeout is 0.1)


class PoisonError(Exception):
    """A message that no retry can fix: it ends in dead letters."""


class TransientError(Exception):
    """A failure that a retry fixes."""


class Recorder:
    """What the handler saw, written by the handler itself."""

    def __init__(self) -> None:
        self.completed: set[int] = set()  # ids whose handler call returned normally
        self.starts: defaultdict[str, list[int]] = defaultdict(list)  # {session: ids, in order}
        self.attempts: defaultdict[int, list[int]] = defaultdict(list)  # {id: msg.attempt seen}
        self.busy: set[str] = set()  # sessions whose handler runs right now
        self.overlapping = 0  # handler entries while the same session was busy


@attrs.frozen(kw_only=True)
class Report:
    """The closing verification. ``ok`` only if nothing was lost or broken."""

    sent: int
    processed: int
    retried: int
    dead: int
    restarts: int
    kills: int
    lost: int
    out_of_order: int
    overlapping: int
    dishonest_attempts: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not (
            self.out_of_order or self.overlapping or self.dishonest_attempts
        )

    def rows(self) -> list[tuple[str, int, str]]:
        """(check, count, meaning) for each line of the verification table."""
        return [
            ("sent", self.sent, "ids returned by send()"),
            ("processed", self.processed, "distinct ids the handler completed"),
            ("retried", self.retried, "failed attempts (raised, timed out, killed)"),
            ("dead", self.dead, "in dead letters after max_attempts"),
            ("restarts", self.restarts, "actor restarts by the supervisor"),
            ("kills", self.kills, "system.kill() of a busy actor"),
            ("lost", self.lost, "sent, yet neither processed nor dead: must be 0"),
            ("out of order", self.out_of_order, "a session's message started before an older one"),
            ("overlapping", self.overlapping, "two handlers at once for one session"),
            (
                "dishonest attempts",
                self.dishonest_attempts,
                "first delivery not attempt 1, or a redelivery not counted up",
            ),
        ]

    def table(self) -> str:
        """The verification as plain text (one line per check)."""
        lines = [f"  {'check':<20}{'count':>8}  meaning", "  " + "-" * 74]
        lines += [f"  {name:<20}{value:>8}  {meaning}" for name, value, meaning in self.rows()]
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class Snapshot:
    """The demo's progress at one moment (for the live display)."""

    seconds: float
    sent: int
    total: int
    processed: int  # distinct ids the handler completed
    in_flight: int
    pending: int
    retried: int
    dead: int
    dead_lettered: int  # in this run
    restarts: int
    kills: int

    def line(self) -> str:
        """One line of text, for a log or a terminal without a live display."""
        return (
            f"[{self.seconds:5.1f}s] sent {self.sent:>6}/{self.total}"
            f"  processed {self.processed:>6}  in flight {self.in_flight:>4}"
            f"  pending {self.pending:>6}  retried {self.retried:>5}"
            f"  dead {self.dead:>4}  restarts {self.restarts:>5}  kills {self.kills:>5}"
        )


def count_lost(sent: Iterable[int], completed: set[int], dead: set[int]) -> int:
    """Acknowledged ids that were neither completed by the handler nor dead-lettered."""
    return sum(1 for i in sent if i not in completed and i not in dead)


def count_out_of_order(starts: dict[str, list[int]]) -> int:
    """Handler starts whose id is older than one already started in that session.

    Ids grow in send order, so a session's starts must never go back: a
    redelivery repeats the current id, and nothing behind it starts before.
    """
    bad = 0
    for ids in starts.values():
        for before, after in pairwise(ids):
            if after < before:
                bad += 1
    return bad


def count_dishonest(sent: Iterable[int], attempts: dict[int, list[int]]) -> int:
    """Ids whose first delivery was not attempt 1, or whose attempts did not grow."""
    bad = 0
    for i in sent:
        seen = attempts.get(i)
        if not seen:
            continue
        if seen[0] != 1 or any(b <= a for a, b in pairwise(seen)):
            bad += 1
    return bad


def still_queued(db: str, ids: set[int]) -> set[int]:
    """Which of ``ids`` are still in the database, pending (read after the system stopped)."""
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT id FROM messages WHERE state < 2").fetchall()
    finally:
        conn.close()
    queued = {row[0] for row in rows if isinstance(row[0], int)}
    return queued & ids


def make_handler(
    recorder: Recorder, rng: random.Random, options: DemoOptions
) -> Callable[[actors.Context, actors.Message], Awaitable[None]]:
    low, high = options.latency

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        session = msg.session_id
        if session in recorder.busy:
            recorder.overlapping += 1
        recorder.busy.add(session)
        recorder.starts[session].append(msg.id)
        recorder.attempts[msg.id].append(msg.attempt)
        try:
            await trio.sleep(rng.uniform(low, high))
            if isinstance(msg.body, dict) and msg.body.get("poison"):
                raise PoisonError(f"message {msg.id} can never be processed")
            if rng.random() < options.hang_rate:
                await trio.sleep_forever()  # handler_timeout cancels this attempt
            if rng.random() < options.fail_rate:
                raise TransientError(f"attempt {msg.attempt} of message {msg.id} failed")
            recorder.completed.add(msg.id)  # no checkpoint after this: it is the outcome
        finally:
            recorder.busy.discard(session)

    return handle


async def run_demo(
    options: DemoOptions,
    out: Callable[[str], None] = print,
    show: Callable[[Snapshot], None] | None = None,
) -> Report:
    """Run the workload on ``options.db`` and return the verification.

    Every ``progress_interval`` seconds the progress goes to ``show``, or
    as a line of text to ``out`` without one.
    """
    if options.db is not None:
        return await _run(options, options.db, out, show)
    with tempfile.TemporaryDirectory(prefix="actors-demo-") as tmp:
        return await _run(options, os.path.join(tmp, "demo.db"), out, show)


async def _run(
    options: DemoOptions,
    db: str,
    out: Callable[[str], None],
    show: Callable[[Snapshot], None] | None,
) -> Report:
    rng = random.Random(options.seed)
    recorder = Recorder()
    sent: list[int] = []
    kills = 0
    names = [f"session-{i:04d}" for i in range(options.sessions)]
    total = options.sessions * options.messages

    async def produce(session: str) -> None:
        for n in range(options.messages):
            body = {"n": n, "poison": rng.random() < options.poison_rate}
            sent.append(await system.send(session, body))
            await trio.sleep(rng.uniform(0, 0.002))

    async def chaos() -> None:
        nonlocal kills
        while True:
            await trio.sleep(rng.expovariate(1 / options.kill_interval))
            if recorder.busy and system.kill(rng.choice(sorted(recorder.busy))):
                kills += 1

    def snapshot() -> Snapshot:
        s = system.statistics()
        return Snapshot(
            seconds=time.monotonic() - started,
            sent=len(sent),
            total=total,
            processed=len(recorder.completed),
            in_flight=s.in_flight,
            pending=s.pending,
            retried=s.failed_attempts,
            dead=s.dead,
            dead_lettered=s.dead_lettered,
            restarts=s.restarts,
            kills=kills,
        )

    async def progress() -> None:
        while True:
            await trio.sleep(options.progress_interval)
            if show is not None:
                show(snapshot())
            else:
                out(snapshot().line())

    out(
        f"demo: {options.sessions} sessions x {options.messages} messages on {db}\n"
        f"      handler sleeps {options.latency[0] * 1000:g}-{options.latency[1] * 1000:g} ms,"
        f" fails {options.fail_rate:.0%} of attempts, poison {options.poison_rate:.1%},"
        f" hangs {options.hang_rate:.1%}; chaos kills a busy actor every"
        f" ~{options.kill_interval * 1000:g} ms"
    )
    started = time.monotonic()
    stopped_by: list[str] = []  # the signal that stopped the run, if one did
    timed_out = False

    async def stop_on_signals(system: actors.System, signals: AsyncIterator[int]) -> None:
        # Outside the system's block: shutdown() cancels the block, and this
        # task must live on to take a second signal.
        async for signum in signals:
            if stopped_by:
                out(f"{signal.Signals(signum).name} again: stopping now")
                await system.shutdown(0)
                continue
            stopped_by.append(signal.Signals(signum).name)
            out(
                f"{stopped_by[0]}: stopping gracefully (running handlers finish, the rest stays"
                " pending; a second signal stops at once)"
            )
            nursery.start_soon(system.shutdown, STOP_GRACE)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async with actors.run_system(
                db,
                handler=make_handler(recorder, rng, options),
                rng=rng,
                max_attempts=4,
                handler_timeout=0.1,
                retry_backoff=actors.Backoff(initial=0.005, maximum=0.05),
                restart_policy=actors.RestartPolicy(
                    max_restarts=1000,
                    window=1.0,
                    backoff=actors.Backoff(initial=0.001, maximum=0.01),
                ),
            ) as system:
                nursery.start_soon(stop_on_signals, system, signals)
                before = system.statistics()
                if system.recovered or before.pending:
                    out(
                        f"      recovered {system.recovered} in-flight message(s) of a previous"
                        f" run; {before.pending} pending in all"
                    )
                async with trio.open_nursery() as workload:
                    workload.start_soon(chaos)
                    workload.start_soon(progress)
                    async with trio.open_nursery() as producers:
                        for name in names:
                            producers.start_soon(produce, name)
                    with trio.move_on_after(options.timeout) as waited:
                        await system.drain()
                    timed_out = waited.cancelled_caught
                    workload.cancel_scope.cancel()
            # (A signal's shutdown() cancelled the block and ended it here.)
            nursery.cancel_scope.cancel()
    if show is not None:
        show(snapshot())  # the final state
    stats = system.statistics()
    if timed_out:
        out(
            f"drain() did not finish within {options.timeout:g}s: {stats.pending} message(s)"
            " still pending in the database"
        )
    mine = set(sent)
    dead = {d.id for d in system.dead_letters() if d.id in mine}
    left: set[int] = set()
    if stopped_by:
        left = still_queued(db, mine - recorder.completed - dead)
        out(
            f"stopped by {stopped_by[0]}: {len(left)} message(s) left pending in the database"
            " for the next run"
        )
    return Report(
        sent=len(sent),
        processed=len(recorder.completed & mine),
        retried=stats.failed_attempts,
        dead=len(dead),
        restarts=stats.restarts,
        kills=kills,
        lost=count_lost(sent, recorder.completed, dead | left),
        out_of_order=count_out_of_order(recorder.starts),
        overlapping=recorder.overlapping,
        dishonest_attempts=count_dishonest(sent, recorder.attempts),
        seconds=time.monotonic() - started,
    )


class LiveDisplay:
    """The demo's progress as a live rich display: two bars and the counts.

    ``with LiveDisplay(console, total) as display: run_demo(..., show=display.update)``
    """

    def __init__(self, console: Console, total: int) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._sent = self._progress.add_task("sent", total=total)
        self._done = self._progress.add_task("finished", total=total)
        self._counts = Text()
        self._live = Live(
            Group(self._progress, self._counts), console=console, refresh_per_second=10
        )

    def __enter__(self) -> LiveDisplay:
        self._live.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.stop()

    def update(self, snap: Snapshot) -> None:
        """Show ``snap`` (finished: completed by the handler or dead-lettered)."""
        self._progress.update(self._sent, completed=snap.sent)
        finished = min(snap.processed + snap.dead_lettered, snap.total)
        self._progress.update(self._done, completed=finished)
        self._counts.plain = (
            f"in flight {snap.in_flight}   pending {snap.pending}   retried {snap.retried}"
            f"   dead {snap.dead}   restarts {snap.restarts}   kills {snap.kills}"
        )
