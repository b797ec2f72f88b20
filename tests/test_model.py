"""Model-based test: the durable queue against a plain-Python model of it.

A hypothesis ``RuleBasedStateMachine`` drives a running system with sends,
kills, handler failures, handler timeouts, time passing (passivation), graceful
restarts of the whole system on the same file, ``drain()``, ``abort()`` and
``retry_dead()``, and after every step compares what the system shows with
what :class:`QueueModel` predicts:

- the rows of the ``messages`` table (id, session, state, attempts);
- ``statistics()``: pending, in flight, dead, processed, failed attempts,
  dead-lettered, restarts, sends (the per-run counters since the last start);
- ``dead_letters()`` with their attempts;
- the handler's own log: the attempt number of every start of every
  message, and per session the order in which messages completed (exactly
  once each: graceful operations never duplicate);
- which sessions have a live actor (``is_active``), i.e. passivation after
  ``idle_timeout`` and nothing else.

Determinism. Each message carries its own plan: ``plan[k]`` is what its
handler does on attempt ``k + 1`` (``"fail"`` raises, ``"hang"`` sleeps until
cancelled, by ``handler_timeout``, a kill or a shutdown), and any attempt
past the plan succeeds. Retry and restart backoff are zero, jitter is zero,
and the system runs on a ``MockClock`` that moves only when a rule moves it,
so after each step (``wait_all_tasks_blocked``) the system sits at a fixed
point the model can compute exactly: every session has run until its queue
is empty or its head hangs. Times are sums of integers and a power of two
(``SHUTDOWN``), so the model's float arithmetic is the clock's.

The system runs in ``trio.run`` on a background thread; rules (synchronous)
hand it coroutines through ``TrioHost.call`` and wait with a real-time
watchdog, so a hang fails the test instead of freezing it.

Examples: ``ACTORS_HYPOTHESIS_EXAMPLES`` (default 100) and
``ACTORS_HYPOTHESIS_STEPS`` (default 40). The default run is derandomized
(the same examples every time); set ``ACTORS_HYPOTHESIS_SEED`` to explore
other ones reproducibly.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import apsw
import attrs
import hypothesis
import hypothesis.strategies as st
import outcome
import trio
import trio.testing
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import actors

MAX_ATTEMPTS = 3
IDLE = 8.0  # idle_timeout
HANDLER_TIMEOUT = 20.0
SHUTDOWN = 2.0**-10  # shutdown_timeout: exact in binary, far from every other deadline
STEPS_OF_TIME = (1.0, 5.0, 9.0, 21.0)  # what the "time passes" rule may jump
SESSIONS = ("a", "b", "c")
WATCHDOG = 30.0  # real seconds any one step may take

NO_BACKOFF = actors.Backoff(initial=0.0, maximum=0.0, jitter=0.0)
OPTIONS: dict[str, Any] = {
    "max_attempts": MAX_ATTEMPTS,
    "idle_timeout": IDLE,
    "handler_timeout": HANDLER_TIMEOUT,
    "shutdown_timeout": SHUTDOWN,
    "retry_backoff": NO_BACKOFF,
    "restart_policy": actors.RestartPolicy(max_restarts=10**6, window=1.0, backoff=NO_BACKOFF),
}

PENDING, IN_FLIGHT, DEAD = 0, 1, 2

# Transitions the examples went through (all examples of one run), so the
# test can insist that the interesting ones were exercised at all.
COVERAGE: Counter[str] = Counter()


class Boom(Exception):
    """What a handler raises when its plan says "fail"."""


# -- the model ------------------------------------------------------------


@attrs.define
class ModelMessage:
    id: int
    session: str
    plan: tuple[str, ...]
    attempts: int = 0
    hang_started: float | None = None  # set while its handler hangs (in flight)

    def action(self, attempt: int) -> str:
        return self.plan[attempt - 1] if attempt <= len(self.plan) else "ok"


@attrs.define
class RunCounters:
    """What statistics() counts since the system started."""

    processed: int = 0
    failed_attempts: int = 0
    dead_lettered: int = 0
    restarts: int = 0
    sends: int = 0


class QueueModel:
    """Per-session FIFO of pending ids, attempts per message, dead letters, time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.queues: dict[str, deque[ModelMessage]] = {s: deque() for s in SESSIONS}
        self.hanging: dict[str, ModelMessage] = {}  # the session's head, in flight
        self.dead: dict[int, ModelMessage] = {}
        self.processed: dict[str, list[int]] = {s: [] for s in SESSIONS}
        self.starts: defaultdict[int, list[int]] = defaultdict(list)
        self.all_ids: list[int] = []
        # When each session's actor began its current idle wait (-inf: no actor).
        self.idle_since: dict[str, float] = dict.fromkeys(SESSIONS, -math.inf)
        self.run = RunCounters()

    # queries

    def active(self, session: str) -> bool:
        return session in self.hanging or self.now < self.idle_since[session] + IDLE

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values()) - len(self.hanging)

    def rows(self) -> list[tuple[int, str, int, int]]:
        rows = [
            (m.id, m.session, IN_FLIGHT if self.hanging.get(s) is m else PENDING, m.attempts)
            for s, q in self.queues.items()
            for m in q
        ]
        rows += [(m.id, m.session, DEAD, m.attempts) for m in self.dead.values()]
        return sorted(rows)

    def find(self, message_id: int) -> tuple[str, ModelMessage | None]:
        if message_id in self.dead:
            return "dead", self.dead[message_id]
        for session, q in self.queues.items():
            for m in q:
                if m.id == message_id:
                    return ("in flight" if self.hanging.get(session) is m else "pending"), m
        return "gone", None

    # transitions

    def enqueue(self, message: ModelMessage) -> None:
        self.queues[message.session].append(message)

    def run_session(self, session: str, at: float) -> None:
        """The session's actor works at time ``at`` until its queue is empty or its head hangs."""
        if session in self.hanging:
            return
        q = self.queues[session]
        while q:
            m = q[0]
            if m.attempts >= MAX_ATTEMPTS:
                # Its last attempt ended without an outcome (cancelled by a
                # shutdown): dead-lettered at the claim.
                COVERAGE["dead letter at claim"] += 1
                self._to_dead(q.popleft())
                continue
            m.attempts += 1
            self.starts[m.id].append(m.attempts)
            action = m.action(m.attempts)
            if action == "ok":
                q.popleft()
                self.processed[session].append(m.id)
                self.run.processed += 1
            elif action == "fail":
                self._failed(m)
            else:
                assert action == "hang"
                m.hang_started = at
                self.hanging[session] = m
                return
        self.idle_since[session] = at

    def _failed(self, m: ModelMessage) -> None:
        """A failed attempt (exception, timeout, kill): retry at once, or dead."""
        COVERAGE["failed attempt"] += 1
        self.run.failed_attempts += 1
        self.run.restarts += 1
        if m.attempts >= MAX_ATTEMPTS:
            q = self.queues[m.session]
            assert q[0] is m
            self._to_dead(q.popleft())

    def _to_dead(self, m: ModelMessage) -> None:
        COVERAGE["dead letter"] += 1
        self.dead[m.id] = m
        self.run.dead_lettered += 1

    def end_hang(self, session: str, at: float) -> None:
        """The hanging handler of ``session`` timed out or was killed at ``at``."""
        m = self.hanging.pop(session)
        m.hang_started = None
        self._failed(m)
        self.run_session(session, at)

    def kill(self, session: str) -> bool:
        if session in self.hanging:
            COVERAGE["kill mid-message"] += 1
            self.end_hang(session, self.now)
            return True
        if self.active(session):  # an idle actor: it restarts and waits again
            COVERAGE["kill idle actor"] += 1
            self.run.restarts += 1
            self.idle_since[session] = self.now
            return True
        return False

    def advance(self, seconds: float) -> None:
        passivated = [s for s in SESSIONS if s not in self.hanging and self.active(s)]
        self.now += seconds
        COVERAGE["passivation"] += sum(not self.active(s) for s in passivated)
        for session in list(self.hanging):
            started = self.hanging[session].hang_started
            assert started is not None
            if started + HANDLER_TIMEOUT <= self.now:
                COVERAGE["timeout"] += 1
                self.end_hang(session, self.now)

    def drain(self) -> None:
        """Time runs (autojump) until every session's queue is empty."""
        end = self.now
        for session in list(self.hanging):
            at = self.now
            while session in self.hanging:
                started = self.hanging[session].hang_started
                assert started is not None
                at = started + HANDLER_TIMEOUT
                COVERAGE["timeout in drain"] += 1
                self.end_hang(session, at)
            end = max(end, at)
        self.now = end

    def restart(self) -> None:
        """Leave ``async with`` (hanging handlers get SHUTDOWN seconds), then re-enter."""
        COVERAGE["restart"] += 1
        if self.hanging:
            COVERAGE["restart with a handler running"] += 1
            self.now += SHUTDOWN
            for m in self.hanging.values():
                m.hang_started = None  # back to pending, its attempt still counted
            self.hanging.clear()
        self.run = RunCounters()
        self.idle_since = dict.fromkeys(SESSIONS, -math.inf)
        for session in SESSIONS:
            if self.queues[session]:
                self.run_session(session, self.now)

    def abort(self, message_id: int) -> bool | None:
        """True/False as ``abort()`` returns, None where it raises ValueError."""
        where, m = self.find(message_id)
        COVERAGE[f"abort {where}"] += 1
        if where == "in flight":
            return None
        if where == "gone":
            return False
        assert m is not None
        if where == "dead":
            del self.dead[message_id]
        else:
            self.queues[m.session].remove(m)
        return True

    def retry_dead(self, ids: list[int]) -> None:
        COVERAGE["retry dead"] += 1
        for message_id in sorted(ids):
            m = self.dead.pop(message_id)
            m.attempts = 0
            self.enqueue(m)
        for session in {self.queues_of(i) for i in ids}:
            self.run_session(session, self.now)

    def queues_of(self, message_id: int) -> str:
        return next(s for s, q in self.queues.items() if any(m.id == message_id for m in q))


# -- the system, on a trio loop in a background thread ----------------------


class TrioHost:
    """A trio loop with a manual MockClock in a thread, hosting one system at a time."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.clock = trio.testing.MockClock()  # rate 0, no autojump: time moves when told
        self.system: actors.System | None = None
        # What the handler saw (trio thread only; read through call()).
        self.starts: defaultdict[int, list[int]] = defaultdict(list)
        self.completed: dict[str, list[int]] = {s: [] for s in SESSIONS}
        self.running: set[str] = set()
        self.violations: list[str] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_system: trio.Event | None = None
        self._system_done: trio.Event | None = None
        self._system_error: BaseException | None = None
        self._ready = threading.Event()
        self._finish: trio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="model-trio", daemon=True)
        self._thread.start()
        if not self._ready.wait(WATCHDOG):
            raise AssertionError("the trio thread did not start")

    def _thread_main(self) -> None:
        trio.run(self._main, clock=self.clock)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._finish = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._finish.wait()
            nursery.cancel_scope.cancel()

    def call(self, afn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``afn()`` on the loop, then wait until every task is blocked; return its value."""
        assert self._token is not None and self._nursery is not None
        nursery = self._nursery
        done = threading.Event()
        box: list[outcome.Outcome[Any]] = []

        async def runner() -> None:
            async def step() -> Any:
                result = await afn()
                await trio.testing.wait_all_tasks_blocked()
                return result

            try:
                box.append(await outcome.acapture(step))
            finally:
                done.set()

        self._token.run_sync_soon(nursery.start_soon, runner)
        if not done.wait(WATCHDOG):
            self._token.run_sync_soon(nursery.cancel_scope.cancel)
            raise AssertionError(f"the system hung: a step took over {WATCHDOG}s of real time")
        return box[0].unwrap()

    # the handler

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> None:
        session = msg.session_id
        if ctx.session_id != session:
            self.violations.append(f"message {msg.id} of {session} ran in {ctx.session_id}")
        if session in self.running:
            self.violations.append(f"{session}: message {msg.id} started while another runs")
        plan = msg.body["plan"]
        action = plan[msg.attempt - 1] if msg.attempt <= len(plan) else "ok"
        self.starts[msg.id].append(msg.attempt)
        self.running.add(session)
        try:
            if action == "fail":
                raise Boom(f"message {msg.id} fails attempt {msg.attempt}")
            if action == "hang":
                await trio.sleep_forever()
        finally:
            self.running.discard(session)
        self.completed[session].append(msg.id)

    # system lifecycle (run on the loop)

    async def _host(self, task_status: trio.TaskStatus[None]) -> None:
        stop = self._stop_system = trio.Event()
        done = self._system_done = trio.Event()
        self._system_error = None
        try:
            async with actors.run_system(self.db_path, handler=self.handler, **OPTIONS) as system:
                self.system = system
                task_status.started()
                await stop.wait()
        except BaseException as exc:  # reported by stop_system / start_system
            self._system_error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            self.system = None
            done.set()

    async def start_system(self) -> actors.System:
        assert self._nursery is not None
        await self._nursery.start(self._host)
        if self._system_error is not None:
            raise self._system_error
        assert self.system is not None
        return self.system

    async def stop_system(self) -> None:
        """Leave ``async with``: hanging handlers get shutdown_timeout, then are cancelled."""
        assert self._stop_system is not None and self._system_done is not None
        self._stop_system.set()
        await trio.testing.wait_all_tasks_blocked()
        if not self._system_done.is_set():
            self.clock.jump(SHUTDOWN)
        await self._system_done.wait()
        if self._system_error is not None:
            raise self._system_error

    def close(self) -> None:
        if self._token is not None and self._finish is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._finish.set)
        self._thread.join(WATCHDOG)


# -- the state machine ------------------------------------------------------

plans = st.lists(st.sampled_from(["fail", "hang"]), max_size=MAX_ATTEMPTS).map(tuple)


class QueueMachine(RuleBasedStateMachine):
    """Drives a system and its model side by side."""

    def __init__(self) -> None:
        super().__init__()
        self._dir = Path(os.environ.get("ACTORS_MODEL_TMP", "/tmp")) / (
            f"actors-model-{os.getpid()}-{id(self)}-{threading.get_ident()}"
        )
        self._dir.mkdir(parents=True, exist_ok=True)
        self.db_path = str(self._dir / "model.db")
        for suffix in ("", "-wal", "-shm", ".lock", ".starts"):
            Path(self.db_path + suffix).unlink(missing_ok=True)
        COVERAGE["examples"] += 1
        self.model = QueueModel()
        self.host = TrioHost(self.db_path)
        self.system: actors.System = self.host.call(self.host.start_system)
        self.reader = apsw.Connection(self.db_path, flags=apsw.SQLITE_OPEN_READONLY)

    def teardown(self) -> None:
        try:
            self.reader.close()
            if self.host.system is not None:
                self.host.call(self.host.stop_system)
        finally:
            self.host.close()
            for suffix in ("", "-wal", "-shm", ".lock", ".starts"):
                Path(self.db_path + suffix).unlink(missing_ok=True)
            self._dir.rmdir()

    # rules

    @rule(session=st.sampled_from(SESSIONS), plan=plans)
    def send(self, session: str, plan: tuple[str, ...]) -> None:
        async def act() -> int:
            return await self.system.send(session, {"plan": list(plan)})

        message_id = self.host.call(act)
        self._sent(message_id, session, plan)
        self.model.run_session(session, self.model.now)

    @rule(items=st.lists(st.tuples(st.sampled_from(SESSIONS), plans), min_size=1, max_size=4))
    def send_many(self, items: list[tuple[str, tuple[str, ...]]]) -> None:
        async def act() -> list[int]:
            return await self.system.send_many((s, {"plan": list(p)}) for s, p in items)

        ids = self.host.call(act)
        assert len(ids) == len(items)
        for message_id, (session, plan) in zip(ids, items, strict=True):
            self._sent(message_id, session, plan)
        for session in dict.fromkeys(s for s, _ in items):
            self.model.run_session(session, self.model.now)

    def _sent(self, message_id: int, session: str, plan: tuple[str, ...]) -> None:
        assert not self.model.all_ids or message_id > self.model.all_ids[-1], message_id
        self.model.all_ids.append(message_id)
        self.model.run.sends += 1
        self.model.enqueue(ModelMessage(message_id, session, plan))

    @rule(session=st.sampled_from(SESSIONS))
    def kill(self, session: str) -> None:
        async def act() -> bool:
            return self.system.kill(session)

        expected = self.model.kill(session)
        assert self.host.call(act) is expected

    @rule(seconds=st.sampled_from(STEPS_OF_TIME))
    def time_passes(self, seconds: float) -> None:
        async def act() -> None:
            self.host.clock.jump(seconds)

        self.host.call(act)
        self.model.advance(seconds)

    @rule()
    def drain(self) -> None:
        clock = self.host.clock

        async def act() -> float:
            clock.autojump_threshold = 0
            try:
                with trio.fail_after(10**6):  # virtual seconds: a stuck drain fails fast
                    await self.system.drain()
            finally:
                clock.autojump_threshold = math.inf
            return trio.current_time()

        now = self.host.call(act)
        self.model.drain()
        assert now == self.model.now, (now, self.model.now)
        stats = self.host.call(self._stats)
        assert stats.pending == 0 and stats.in_flight == 0, stats

    @rule()
    def restart(self) -> None:
        self.host.call(self.host.stop_system)
        self.system = self.host.call(self.host.start_system)
        self.model.restart()
        # A graceful stop leaves nothing in flight for recovery.
        assert self.system.recovered == 0

    @rule(data=st.data())
    @precondition(lambda self: bool(self.model.all_ids))
    def abort(self, data: st.DataObject) -> None:
        message_id = data.draw(st.sampled_from(self.model.all_ids), label="message id")

        async def act() -> bool | None:
            try:
                return await self.system.abort(message_id)
            except ValueError:
                return None

        expected = self.model.abort(message_id)
        assert self.host.call(act) is expected

    @rule(data=st.data())
    @precondition(lambda self: bool(self.model.dead))
    def retry_dead(self, data: st.DataObject) -> None:
        every = data.draw(st.booleans(), label="all")
        ids = sorted(self.model.dead)
        if not every:
            ids = [data.draw(st.sampled_from(ids), label="dead id")]

        async def act() -> int:
            return await self.system.retry_dead(None if every else ids[0])

        assert self.host.call(act) == len(ids)
        self.model.retry_dead(ids)

    # comparisons after every step

    async def _stats(self) -> actors.SystemStatistics:
        return self.system.statistics()

    @invariant()
    def same_rows(self) -> None:
        COVERAGE["states compared"] += 1

        async def handed() -> set[int]:
            return {m.id for a in self.system._sup._actors.values() for m in a.handed}

        # Claimed on delivery but not started (queued behind a hanging
        # handler) is, to everyone but the store, pending with its attempt
        # not counted: the same as after a restart (see Store._recover).
        queued = self.host.call(handed)
        rows = [
            (i, s, PENDING, a - 1) if i in queued and st == IN_FLIGHT else (i, s, st, a)
            for i, s, st, a in self.reader.execute(
                "SELECT id, session_id, state, attempts FROM messages ORDER BY id"
            )
        ]
        assert rows == self.model.rows()

    @invariant()
    def same_statistics(self) -> None:
        stats = self.host.call(self._stats)
        m, run = self.model, self.model.run
        got = (
            stats.pending,
            stats.in_flight,
            stats.dead,
            stats.processed,
            stats.failed_attempts,
            stats.dead_lettered,
            stats.restarts,
            stats.sends,
        )
        want = (
            m.pending(),
            len(m.hanging),
            len(m.dead),
            run.processed,
            run.failed_attempts,
            run.dead_lettered,
            run.restarts,
            run.sends,
        )
        assert got == want, (
            "(pending, in_flight, dead, processed, failed, dead_lettered, restarts, sends): "
            f"{got} != {want}"
        )

    @invariant()
    def same_dead_letters(self) -> None:
        async def read() -> list[tuple[int, str, int]]:
            return [(d.id, d.session_id, d.attempts) for d in self.system.dead_letters()]

        want = sorted((m.id, m.session, m.attempts) for m in self.model.dead.values())
        assert self.host.call(read) == want

    @invariant()
    def same_handler_history(self) -> None:
        async def read() -> tuple[dict[str, list[int]], dict[int, list[int]], list[str]]:
            return (
                {s: list(v) for s, v in self.host.completed.items()},
                {k: list(v) for k, v in self.host.starts.items()},
                list(self.host.violations),
            )

        completed, starts, violations = self.host.call(read)
        assert violations == []
        # Each message completed once, in its session's queue order.
        assert completed == self.model.processed
        assert starts == dict(self.model.starts)

    @invariant()
    def same_live_actors(self) -> None:
        async def read() -> tuple[dict[str, bool], int, float]:
            live = {s: self.system.is_active(s) for s in SESSIONS}
            return live, self.system.statistics().active_actors, trio.current_time()

        live, active, now = self.host.call(read)
        assert now == self.model.now
        want = {s: self.model.active(s) for s in SESSIONS}
        assert live == want
        assert active == sum(want.values())


def _settings() -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=int(os.environ.get("ACTORS_HYPOTHESIS_EXAMPLES", "100")),
        stateful_step_count=int(os.environ.get("ACTORS_HYPOTHESIS_STEPS", "40")),
        deadline=None,
        derandomize="ACTORS_HYPOTHESIS_SEED" not in os.environ,
        database=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
        print_blob=True,
    )


def test_queue_matches_model(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("ACTORS_MODEL_TMP", str(tmp_path))
    factory: Any = QueueMachine
    if "ACTORS_HYPOTHESIS_SEED" in os.environ:
        factory = hypothesis.seed(int(os.environ["ACTORS_HYPOTHESIS_SEED"]))(QueueMachine)
    COVERAGE.clear()
    run_state_machine_as_test(factory, settings=_settings())
    # The examples went through every kind of transition, not only the easy ones.
    print("\nmodel:", ", ".join(f"{k}={v}" for k, v in sorted(COVERAGE.items())))
    missing = sorted(set(EXPECTED_COVERAGE) - set(COVERAGE))
    assert not missing, (missing, COVERAGE)


EXPECTED_COVERAGE = (
    "failed attempt",
    "dead letter",
    "dead letter at claim",
    "kill mid-message",
    "kill idle actor",
    "timeout",
    "timeout in drain",
    "passivation",
    "restart",
    "restart with a handler running",
    "abort in flight",
    "abort pending",
    "abort dead",
    "abort gone",
    "retry dead",
)
