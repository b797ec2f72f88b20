"""``actors demo`` (also ``python -m actors demo``): a chaos workload that checks its own result.

Many sessions send concurrently into a system on a local SQLite file, their
sends spread over ``duration`` seconds. The handler sleeps a few
milliseconds, sometimes raises, rarely hangs past ``handler_timeout``, and
always fails on "poison" messages; a chaos task kills random busy actors
mid-message. When everything has drained, the demo compares what ``send()``
acknowledged with what the handler completed and what sits in dead letters,
and prints the verdict as a table.

The handler's own record is the ground truth: a message counts as processed
only if a handler call for it returned normally. That record is kept on
disk beside the database (:class:`Ledger`), so a run killed with
``kill -9`` is checked too: the next run on the same file accounts for every
id the killed run acknowledged. The system is driven through the public API
only; the final accounting reads the database's unfinished ids read-only.

SIGTERM or SIGINT (Ctrl-C) stops the run gracefully (``System.shutdown``):
nothing new starts, running handlers finish, their acks commit, and what is
left stays pending in the database for the next run (``--db``); the
verification then counts it as pending, not lost. A second signal stops at
once (running handlers are cancelled, their messages run again next time).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from itertools import pairwise

import attrs
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

import actors
from actors.store import StoreError, database_path
from actors.store.sqlite_views import SqliteViews
from actors.testing import Recorder

MAX_ATTEMPTS = 4
STOP_GRACE = 5.0  # seconds running handlers get after SIGTERM / SIGINT (handler_timeout is 0.1)


@attrs.frozen(kw_only=True)
class DemoOptions:
    """The knobs of the demo (the command line sets them)."""

    db: str | None = None  # None: a fresh file in a temporary directory
    sessions: int = 500
    messages: int = 20  # per session
    duration: float = 10.0  # seconds over which each session spreads its sends
    seed: int | None = None
    fail_rate: float = 0.05  # chance that an attempt raises
    poison_rate: float = 0.004  # chance that a message fails on every attempt
    hang_rate: float = 0.002  # chance that an attempt outlives handler_timeout
    kill_interval: float = 0.01  # mean seconds between kill attempts
    latency: tuple[float, float] = (0.001, 0.005)  # handler sleep range, seconds
    progress_interval: float = 0.5
    timeout: float = 60.0  # give up waiting for drain() after this long


class PoisonError(Exception):
    """A message that no retry can fix: it ends in dead letters."""


class TransientError(Exception):
    """A failure that a retry fixes."""


LEDGER_SUFFIX = ".demo-ledger"
_SQLITE_HEADER = b"SQLite format 3\x00"  # the first bytes of every SQLite database file


class DemoDatabaseError(ValueError):
    """A ``--db`` the demo must not run on: refused before anything is touched."""


def check_demo_database(db: str) -> str:
    """The demo's database path, normalised; refuse one the demo did not create.

    The demo runs its own handler on every pending message of the file, and
    leaves its messages and dead letters there. On an application's
    database (an operator's slip: ``--db app.db``) it would run, ack and
    delete the application's messages. So it runs only on a path with no
    file yet, or on a database it created: one with its ledger
    (``<db>.demo-ledger``) beside it, which the demo writes before it
    creates the database. Checked before the ledger, the lock or the
    database is created or opened for writing.

    Raises:
      ValueError: a path no database can have (see ``run_system``).
      DemoDatabaseError: a directory, a file that is not an SQLite
        database, or a database without the demo's ledger beside it (an
        application's; ``run_system`` refuses a ledger's neighbour that is
        not an actors database).
    """
    path = database_path(db)
    if not os.path.lexists(path):
        return path
    if not os.path.isfile(path):
        raise DemoDatabaseError(f"{db!r} is not a regular file")
    fresh = "give a path with no file, or no --db for a temporary one"
    # Read as bytes, not opened with SQLite: opening a database in WAL mode
    # creates its -wal and -shm files, and the file is not ours to touch.
    try:
        with open(path, "rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise DemoDatabaseError(f"cannot read {db!r}: {exc}") from None
    if header and header != _SQLITE_HEADER:  # (an empty file is a new database to SQLite)
        raise DemoDatabaseError(f"{db!r} is not an SQLite database; {fresh}")
    if not os.path.isfile(path + LEDGER_SUFFIX):
        raise DemoDatabaseError(
            f"{db!r} was not created by the demo (it has no demo ledger"
            f" {path + LEDGER_SUFFIX!r} beside it): the demo would run an application's"
            f" messages with its own handler; {fresh}"
        )
    return path


class Ledger:
    """What the demo's runs on one database acknowledged and completed, on disk.

    A small SQLite file beside the database (``<db>.demo-ledger``), written
    with the standard library's ``sqlite3``: the demo is an application of
    ``actors``, and its own bookkeeping is not the store's. An id is
    written as soon as ``send()`` returns it; a completion before the
    handler returns, so before its acknowledgement can commit. Each write
    commits on its own (WAL, ``synchronous=OFF``: what is written survives
    the process, however it dies, though not a power loss). So a run killed
    at any moment leaves a ledger that the next run checks as its own: an
    id acknowledged and not completed must still be in the database,
    pending or dead. (An id whose ``send()`` returned an instant before the
    kill may be missing from the ledger: it is not checked, and runs anyway.)
    """

    def __init__(self, db_path: str) -> None:
        self.path = db_path + LEDGER_SUFFIX
        # isolation_level=None: each write commits on its own (autocommit).
        self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            # One demo at a time holds the database (its lock): no shared memory
            # to coordinate readers, which halves the cost of a write.
            self._db.execute("PRAGMA locking_mode = EXCLUSIVE").fetchall()
            self._db.execute("PRAGMA journal_mode = WAL").fetchall()
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.executescript(
                "BEGIN;"
                "CREATE TABLE IF NOT EXISTS runs (run INTEGER PRIMARY KEY, started_at REAL);"
                "CREATE TABLE IF NOT EXISTS sent (id INTEGER PRIMARY KEY, run INTEGER NOT NULL)"
                " WITHOUT ROWID;"
                "CREATE TABLE IF NOT EXISTS completed (id INTEGER PRIMARY KEY,"
                " run INTEGER NOT NULL) WITHOUT ROWID;"
                "COMMIT"
            )
            cursor = self._db.execute("INSERT INTO runs (started_at) VALUES (?)", (time.time(),))
        except BaseException:
            self._db.close()
            raise
        assert cursor.lastrowid is not None
        self.run = cursor.lastrowid
        self.earlier_sent: set[int] = {
            int(i) for (i,) in self._db.execute("SELECT id FROM sent WHERE run < ?", (self.run,))
        }

    def sent(self, message_id: int) -> None:
        """``send()`` returned ``message_id``."""
        self._db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?)", (message_id, self.run))

    def completed(self, message_id: int) -> None:
        """A handler call for ``message_id`` is about to return normally."""
        self._db.execute("INSERT OR IGNORE INTO completed VALUES (?, ?)", (message_id, self.run))

    def completed_ids(self) -> set[int]:
        """Every id a handler completed, in any run."""
        return {int(i) for (i,) in self._db.execute("SELECT id FROM completed")}

    def close(self) -> None:
        self._db.close()


def unfinished_ids(db_path: str) -> set[int]:
    """Ids pending (or left in flight) in the database, read-only; empty without one."""
    try:
        views = SqliteViews.open(db_path)
    except StoreError:
        return set()  # none, or not an actors database: run_system says so
    try:
        return views.unfinished_ids()
    except StoreError:
        return set()
    finally:
        views.close()


@attrs.frozen(kw_only=True)
class Report:
    """The closing verification. ``ok`` only if nothing was lost or broken, and all finished.

    ``sent``, ``processed``, ``dead``, ``pending``: this run's ids, and what
    became of them, each id counted once, in that order (completed by a
    handler; else dead-lettered; else still waiting); the ids none of them
    holds are ``lost``. ``earlier_*``: the same for the ids that earlier runs on
    this database acknowledged (a killed run's too, from the :class:`Ledger`).
    ``lost`` counts both.
    """

    sent: int
    processed: int
    dead: int
    pending: int = 0
    earlier_sent: int = 0
    earlier_processed: int = 0
    earlier_dead: int = 0
    earlier_pending: int = 0
    failed_attempts: int
    retried: int
    kills: int
    lost: int
    out_of_order: int
    overlapping: int
    dishonest_attempts: int
    seconds: float
    stopped_by: str | None = None  # the signal that stopped the run gracefully, if one did

    @property
    def finished(self) -> bool:
        """Nothing acknowledged is still waiting (drain() finished in time)."""
        return self.pending == 0 and self.earlier_pending == 0

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and (self.finished or self.stopped_by is not None)
            and not (self.out_of_order or self.overlapping or self.dishonest_attempts)
        )

    def rows(self) -> list[tuple[str, int, str]]:
        """(check, count, meaning) for each line of the verification table."""
        rows = [
            ("sent", self.sent, "ids returned by send() in this run"),
            ("processed", self.processed, "of them, completed by the handler"),
            ("dead", self.dead, "of the rest, in dead letters after max_attempts"),
        ]
        if self.pending:
            why = (
                f"left pending by the stop ({self.stopped_by}) for the next run"
                if self.stopped_by
                else "still waiting (drain() timed out)"
            )
            rows.append(("pending", self.pending, f"of the rest, {why}"))
        if self.earlier_sent:
            rows += [
                (
                    "earlier sent",
                    self.earlier_sent,
                    "ids send() returned in earlier runs on this file (a killed one's too)",
                ),
                ("earlier processed", self.earlier_processed, "of them, completed then or now"),
                ("earlier dead", self.earlier_dead, "of the rest, in dead letters"),
                ("earlier pending", self.earlier_pending, "of the rest, still waiting"),
            ]
        rows += [
            (
                "failed attempts",
                self.failed_attempts,
                "attempts that raised, timed out or were killed (each restarts its actor)",
            ),
            ("retried", self.retried, "messages delivered again after a failure or a crash"),
            ("kills", self.kills, "system.kill() of a busy actor"),
            (
                "lost",
                self.lost,
                "acknowledged, yet neither processed, dead nor pending: must be 0",
            ),
            ("out of order", self.out_of_order, "a session's message started before an older one"),
            ("overlapping", self.overlapping, "two handlers at once for one session"),
            (
                "dishonest attempts",
                self.dishonest_attempts,
                "first delivery not attempt 1, or a redelivery not counted up",
            ),
        ]
        return rows

    def table(self) -> str:
        """The verification as plain text (one line per check)."""
        lines = [f"  {'check':<20}{'count':>8}  meaning", "  " + "-" * 74]
        lines += [f"  {name:<20}{value:>8}  {meaning}" for name, value, meaning in self.rows()]
        return "\n".join(lines)


@attrs.frozen(kw_only=True)
class Snapshot:
    """The demo's progress at one moment (for the live display).

    ``sent``, ``processed`` and ``dead`` are this run's messages, as the
    verification table counts them; ``earlier_done`` of ``earlier_left``
    count the messages earlier runs left unfinished that this run
    completed, and ``earlier_dead`` the dead letters of earlier runs'
    messages (dead-lettered then or now); ``pending`` and ``in_flight``
    are the system's (all runs' messages), and ``failed_attempts`` this
    run's.
    """

    seconds: float
    sent: int
    total: int
    processed: int  # this run's ids the handler completed
    dead: int  # this run's ids in dead letters
    earlier_left: int  # earlier runs' ids unfinished when this run started
    earlier_done: int  # of them, completed by this run's handler
    earlier_dead: int  # earlier runs' ids in dead letters
    in_flight: int
    pending: int
    failed_attempts: int
    kills: int

    def line(self) -> str:
        """One line of text, for a log or a terminal without a live display."""
        earlier = (
            f"  | earlier runs: {self.earlier_done}/{self.earlier_left} left done,"
            f" dead {self.earlier_dead}"
            if self.earlier_left or self.earlier_dead
            else ""
        )
        return (
            f"[{self.seconds:5.1f}s] this run: sent {self.sent:>6}/{self.total}"
            f"  processed {self.processed:>6}  dead {self.dead:>4}{earlier}"
            f"  | in flight {self.in_flight:>4}  pending {self.pending:>6}"
            f"  failed {self.failed_attempts:>5}  kills {self.kills:>5}"
        )


def count_lost(sent: Iterable[int], completed: set[int], dead: set[int]) -> int:
    """Acknowledged ids that were neither completed by the handler nor dead-lettered.

    (Pass the ids still pending with the dead ones: they are not lost.)
    """
    return sum(1 for i in sent if i not in completed and i not in dead)


def count_dishonest(sent: Iterable[int], attempts: dict[int, list[int]]) -> int:
    """Ids whose first delivery was not attempt 1, or whose attempts did not grow.

    Weaker than ``Recorder``'s honest-attempts check on purpose: a kill that
    lands after a handler returned, before its acknowledgement, runs the
    message again (at least once), and the messages of earlier runs were
    not all seen, so only this run's ids (``sent``) are checked.
    """
    bad = 0
    for i in sent:
        seen = attempts.get(i)
        if not seen:
            continue
        if seen[0] != 1 or any(b <= a for a, b in pairwise(seen)):
            bad += 1
    return bad


def make_handler(
    ledger: Ledger, rng: random.Random, options: DemoOptions, completed: Callable[[int], None]
) -> Callable[[actors.Context, actors.Message], Awaitable[None]]:
    """The workload; ``completed(id)`` after the ledger has the completion."""
    low, high = options.latency

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep(rng.uniform(low, high))
        if isinstance(msg.body, dict) and msg.body.get("poison"):
            raise PoisonError(f"message {msg.id} can never be processed")
        if rng.random() < options.hang_rate:
            await trio.sleep_forever()  # handler_timeout cancels this attempt
        if rng.random() < options.fail_rate:
            raise TransientError(f"attempt {msg.attempt} of message {msg.id} failed")
        # No checkpoint after this: the completion is on disk before the ack.
        ledger.completed(msg.id)
        completed(msg.id)

    return handle


async def run_demo(
    options: DemoOptions,
    out: Callable[[str], None] = print,
    show: Callable[[Snapshot], None] | None = None,
) -> Report:
    """Run the workload on ``options.db`` and return the verification.

    Every ``progress_interval`` seconds the progress goes to ``show``, or
    as a line of text to ``out`` without one.

    Raises:
      DemoDatabaseError: ``options.db`` is a file the demo did not create
        (see :func:`check_demo_database`); nothing was touched.
    """
    if options.db is not None:
        return await _DemoRun(options, check_demo_database(options.db), out, show).run()
    with tempfile.TemporaryDirectory(prefix="actors-demo-") as tmp:
        return await _DemoRun(options, os.path.join(tmp, "demo.db"), out, show).run()


@attrs.frozen
class _Outcome:
    """What a run left, read once its system stopped (each id one way: see _DemoRun.report)."""

    stats: actors.SystemStatistics
    dead: set[int]
    waiting: set[int]
    done: set[int]
    earlier: set[int]


class _DemoRun:
    """One run of the demo on ``db``: its workload, its progress and its verification.

    The handler's calls are recorded by an ``actors.testing.Recorder``,
    whose checks say whether sessions ran in order and one message at a
    time; the ledger says what was acknowledged and completed, across runs.
    """

    def __init__(
        self,
        options: DemoOptions,
        db: str,
        out: Callable[[str], None],
        show: Callable[[Snapshot], None] | None,
    ) -> None:
        self.options = options
        self.db = db
        self.out = out
        self.show = show
        self.rng = random.Random(options.seed)
        self.recorder = Recorder()
        self.sent: list[int] = []
        self.mine: set[int] = set()  # sent, as a set
        self.kills = 0
        self.processed = 0  # this run's ids the handler completed
        self.earlier_done = 0  # earlier runs' ids the handler completed
        # What earlier runs left unfinished (a killed run's messages among them).
        self.left = unfinished_ids(db)
        self.stopped_by: str | None = None  # the signal that stopped the run, if one did
        self.timed_out = False
        self.started = time.monotonic()
        # The dead letters' ids (which run a dead letter belongs to is told by
        # its id), read again only when the system's count of them changed.
        self._dead_count = -1
        self._dead_now: set[int] = set()

    async def run(self) -> Report:
        """Run the workload, wait for it (or a signal), and verify."""
        options = self.options
        self.out(
            f"demo: {options.sessions} sessions x {options.messages} messages on {self.db},"
            f" sent over ~{options.duration:g}s\n"
            f"      handler sleeps {options.latency[0] * 1000:g}-{options.latency[1] * 1000:g}"
            f" ms, fails {options.fail_rate:.0%} of attempts, poison {options.poison_rate:.1%},"
            f" hangs {options.hang_rate:.1%}; chaos kills a busy actor every"
            f" ~{options.kill_interval * 1000:g} ms"
        )
        self.started = time.monotonic()
        try:
            ledger = Ledger(self.db)
        except sqlite3.Error as exc:
            raise actors.StoreError(
                f"cannot open the demo's ledger {self.db + LEDGER_SUFFIX!r}: {exc}"
            ) from exc
        try:
            system = await self._drive(ledger)
            outcome = self._outcome(system, ledger)
        finally:
            ledger.close()
        return self.report(outcome)

    async def _drive(self, ledger: Ledger) -> actors.System:
        """The system's whole run: until drained, timed out or stopped by a signal."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as outer:
                async with actors.run_system(
                    self.db,
                    handler=self.recorder.wrap(
                        make_handler(ledger, self.rng, self.options, self._completed)
                    ),
                    rng=self.rng,
                    max_attempts=MAX_ATTEMPTS,
                    handler_timeout=0.1,
                    retry_backoff=actors.Backoff(initial=0.005, maximum=0.05),
                    restart_policy=actors.RestartPolicy(
                        max_restarts=1000,
                        window=1.0,
                        backoff=actors.Backoff(initial=0.001, maximum=0.01),
                    ),
                ) as system:
                    outer.start_soon(self._stop_on_signals, system, signals, outer)
                    if ledger.earlier_sent or self.left:
                        self.out(
                            f"      earlier runs on this file acknowledged"
                            f" {len(ledger.earlier_sent)} message(s); {len(self.left)} were"
                            f" unfinished ({system.recovered} left in flight by a process that"
                            " died): this run finishes and checks them too"
                        )
                    await self._workload(system, ledger)
                # (A signal's shutdown() cancels the block and ends it here.)
                outer.cancel_scope.cancel()  # the signal watcher
        return system

    async def _workload(self, system: actors.System, ledger: Ledger) -> None:
        """Send from every session with chaos and progress going, then drain (bounded)."""
        async with trio.open_nursery() as workload:
            workload.start_soon(self._chaos, system)
            workload.start_soon(self._progress, system)
            async with trio.open_nursery() as producers:
                for i in range(self.options.sessions):
                    producers.start_soon(self._produce, system, ledger, f"session-{i:04d}")
            with trio.move_on_after(self.options.timeout) as waited:
                await system.drain()
            self.timed_out = waited.cancelled_caught
            workload.cancel_scope.cancel()

    def _completed(self, message_id: int) -> None:
        if message_id in self.left:
            self.earlier_done += 1
        else:
            self.processed += 1

    async def _produce(self, system: actors.System, ledger: Ledger, session: str) -> None:
        options = self.options
        spacing = options.duration / options.messages  # mean seconds between a session's sends
        for n in range(options.messages):
            body = {"n": n, "poison": self.rng.random() < options.poison_rate}
            message_id = await system.send(session, body)
            ledger.sent(message_id)  # at once: no checkpoint in between
            self.sent.append(message_id)
            self.mine.add(message_id)
            await trio.sleep(self.rng.uniform(0.5, 1.5) * spacing)

    async def _chaos(self, system: actors.System) -> None:
        while True:
            await trio.sleep(self.rng.expovariate(1 / self.options.kill_interval))
            busy = self.recorder.running()
            if busy and system.kill(self.rng.choice(sorted(busy))):
                self.kills += 1

    async def _progress(self, system: actors.System) -> None:
        while True:
            await trio.sleep(self.options.progress_interval)
            if self.show is not None:
                self.show(self.snapshot(system))
            else:
                self.out(self.snapshot(system).line())

    async def _stop_on_signals(
        self, system: actors.System, signals: AsyncIterator[int], outer: trio.Nursery
    ) -> None:
        # Outside the system's block: shutdown() cancels the block, and this
        # task must live on to take a second signal.
        async for signum in signals:
            if self.stopped_by is not None:
                self.out(f"{signal.Signals(signum).name} again: stopping now")
                await system.shutdown(0)
                continue
            self.stopped_by = signal.Signals(signum).name
            self.out(
                f"{self.stopped_by}: stopping gracefully (running handlers finish, the rest"
                " stays pending; a second signal stops at once)"
            )
            outer.start_soon(system.shutdown, STOP_GRACE)

    def snapshot(self, system: actors.System) -> Snapshot:
        """The progress now."""
        s = system.statistics()
        if s.dead != self._dead_count:
            self._dead_count, self._dead_now = s.dead, {d.id for d in system.dead_letters()}
        dead_mine = len(self._dead_now & self.mine)
        return Snapshot(
            seconds=time.monotonic() - self.started,
            sent=len(self.sent),
            total=self.options.sessions * self.options.messages,
            processed=self.processed,
            dead=dead_mine,
            earlier_left=len(self.left),
            earlier_done=self.earlier_done,
            earlier_dead=len(self._dead_now) - dead_mine,
            in_flight=s.in_flight,
            pending=s.pending,
            failed_attempts=s.failed_attempts,
            kills=self.kills,
        )

    def _outcome(self, system: actors.System, ledger: Ledger) -> _Outcome:
        if self.show is not None:
            self.show(self.snapshot(system))  # the final state
        stats = system.statistics()
        if self.timed_out:
            self.out(
                f"drain() did not finish within {self.options.timeout:g}s: {stats.pending}"
                " message(s) still pending in the database"
            )
        return _Outcome(
            stats=stats,
            dead={d.id for d in system.dead_letters()},
            waiting=unfinished_ids(self.db),
            done=ledger.completed_ids(),
            earlier=ledger.earlier_sent,
        )

    def report(self, outcome: _Outcome) -> Report:
        """The verification of what the run left."""
        mine, done, earlier = set(self.sent), outcome.done, outcome.earlier
        # Each id one way, in this order (a message completed just before a crash
        # runs again after it, and may even end dead: at least once).
        dead = outcome.dead - done
        waiting = outcome.waiting - (done | dead)
        found = self.recorder.violations()
        attempts = self.recorder.attempts()
        return Report(
            sent=len(self.sent),
            processed=len(mine & done),
            dead=len(mine & dead),
            pending=len(mine & waiting),
            earlier_sent=len(earlier),
            earlier_processed=len(earlier & done),
            earlier_dead=len(earlier & dead),
            earlier_pending=len(earlier & waiting),
            failed_attempts=outcome.stats.failed_attempts,
            retried=sum(1 for seen in attempts.values() if max(seen) > 1),
            kills=self.kills,
            lost=count_lost([*earlier, *self.sent], done, dead | waiting),
            out_of_order=len(found.out_of_order),
            overlapping=len(found.overlapping),
            dishonest_attempts=count_dishonest(self.sent, attempts),
            seconds=time.monotonic() - self.started,
            stopped_by=self.stopped_by,
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
        """Show ``snap`` (finished: this run's messages completed, or dead-lettered)."""
        self._progress.update(self._sent, completed=snap.sent)
        finished = min(snap.processed + snap.dead, snap.total)
        self._progress.update(self._done, completed=finished)
        earlier = (
            f"earlier runs: {snap.earlier_done}/{snap.earlier_left} left done,"
            f" dead {snap.earlier_dead}   "
            if snap.earlier_left or snap.earlier_dead
            else ""
        )
        self._counts.plain = (
            f"this run: dead {snap.dead}   {earlier}in flight {snap.in_flight}"
            f"   pending {snap.pending}   failed attempts {snap.failed_attempts}"
            f"   kills {snap.kills}"
        )
