"""One session's actor: a written state machine that claims, runs and acks its messages.

A :class:`SessionActor` lives in the supervisor's registry while its session
is active. It runs *incarnations* one after another: each incarnation is a
fresh instance of the user's actor, so a crash never leaks state into the
next attempt. Where it is at any moment is its :class:`Phase`; every change
of phase goes through :meth:`SessionActor._to`, which asserts that the
change is one of :data:`TRANSITIONS` (the table in docs/architecture.md,
checked against this one by tests/test_architecture.py).

Serving is a loop of a synchronous decision (:meth:`SessionActor._next_step`:
what to do next, given the phase and what is known) and the awaits that
carry it out, as trio's ``send_nowait``/``send`` split decisions from waits.

The database is the source of truth for order. Every message reaches the
handler claimed in the database, its attempt counted: either by the actor's
own claim, which reads the session's head (and, in bulk, the fresh messages
queued right behind it) in the transaction that counts the attempts, or
inserted claimed by the router and handed to the actor (claim on delivery,
only when nothing of the session waits in the database). Both kinds wait in
the ``handed`` queue (bulk-claimed ones at its front), at most
``mailbox_size`` of each, in seq order; whatever ends an incarnation gives
back those not started, so no in-memory queue can disagree with what is
durable. A notice is an integer (``notified_seq``: "work committed up to
seq N"); an actor with nothing to do parks until a notice beyond what it
claimed, a handoff or a wake-up reschedules it. Acks are pipelined: the
next handed message runs while the previous ack commits (acks commit in
order; the start table keeps recovery honest).

The actor sees its supervisor only through :class:`ActorHost`, and its
handler's context only through :class:`~actors._session.SessionData`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
import trio

from ._clock import Clock
from ._config import Config
from ._errors import ActorKilledError, HandlerTimeoutError, StoreError
from ._failure import FailureText, describe, rejected
from ._gauge import Gauge
from ._records import Message
from ._reply import Reply
from ._session import SessionData
from ._streams import Outputs
from ._wake import WOKEN
from ._watchdog import IdleWatch, Watchdog
from .store import Ack, Claim, StartMarks, Store

log = logging.getLogger("actors.actor")


class Instance(Protocol):
    """One incarnation of the user's actor (an ``actors.Actor``)."""

    async def started(self, ctx: Any) -> None: ...
    async def handle(self, ctx: Any, msg: Message) -> Any: ...
    async def stopped(self, ctx: Any) -> None: ...


@attrs.frozen
class Behaviour:
    """What the session actors run, made from ``run_system``'s handler (``actor_factory``).

    Attributes:
      new_instance: builds a fresh instance for each incarnation.
      loads_state_at_start: the instance has its own ``started`` hook, which
        may read ``ctx.state``: the state is loaded before it (otherwise
        with the first claim, in the same transaction).
      function: a function handler, called directly with ``(ctx, msg)``
        instead of through its instance's ``handle`` (one frame fewer per
        message).
    """

    new_instance: Callable[[], Instance]
    loads_state_at_start: bool
    function: Callable[[Any, Message], Awaitable[Any]] | None


class Waiters(Protocol):
    """The line of sessions waiting for a slot, as an actor sees it."""

    @property
    def has_waiters(self) -> bool: ...  # some session with work waits for a slot


class Isolating(Protocol):
    """The isolation of crash suspects, as an actor sees it."""

    @property
    def holder(self) -> SessionActor | None: ...  # the actor running a suspect alone


class ActorHost(Protocol):
    """What a session actor may read, ask and tell of its supervisor.

    Read: the options, the clock, the store, whether the system stops,
    whether others wait for a slot (``line``), who runs alone
    (``isolation``), and the objects an
    actor reports to on its hot path (the busy count, the deadline
    watches, the idle set, the replies and subscribers). Ask: a context,
    a restart delay, a retry delay, isolation, leave. Tell: what happened
    (started, acked, sent, dead-lettered, failed, rejected).
    """

    config: Config
    clock: Clock
    store: Store
    behaviour: Behaviour
    busy: Gauge  # actors holding a claimed message: follows SessionActor.in_flight
    watchdog: Watchdog
    idle_watch: IdleWatch
    idle_actors: set[SessionActor]  # parked actors (an idle one leaves first for a waiter)
    actor_tasks: dict[trio.lowlevel.Task, SessionActor]
    outputs: Outputs
    observer: Callable[[Message, float], None] | None
    stopping: bool

    # Read per message, so the objects themselves: a property of the host's
    # that asked them would be one more call each time.
    @property
    def line(self) -> Waiters: ...
    @property
    def isolation(self) -> Isolating: ...
    @property
    def replies(self) -> Mapping[int, Reply]: ...  # message ids an ask() waits for
    def new_context(self, data: SessionData) -> Any: ...
    def retry_delay(self, attempt: int) -> float: ...
    def on_restart(
        self, actor: SessionActor, failure: BaseException, summary: str | None = None
    ) -> tuple[float, bool]: ...
    async def isolate(self, actor: SessionActor) -> None: ...
    def end_isolation(self, actor: SessionActor) -> None: ...
    async def wait_isolation(self, actor: SessionActor) -> None: ...
    def retire(self, actor: SessionActor, outcome: Exit) -> bool: ...
    def forget(self, actor: SessionActor) -> None: ...
    def on_actor_started(self, actor: SessionActor) -> None: ...
    def on_acked(self) -> None: ...
    def on_acks_committed(self, result: tuple[int, list[tuple[str, int]] | None]) -> None: ...
    def on_sent(self, sent: list[tuple[str, int]]) -> None: ...
    def on_dead_lettered(
        self, session_id: str, count: int, ids: tuple[int, ...] = (), reason: str = ""
    ) -> None: ...
    def on_rejected(self, actor: SessionActor) -> None: ...
    def answer(self, msg_id: int, result: object) -> None: ...
    def on_attempt_failed(
        self,
        session_id: str,
        msg: Message,
        failure: BaseException,
        dead: bool,
        text: FailureText | None = None,
    ) -> None: ...


def failure_of(exc: BaseException) -> BaseException | None:
    """The failure that ``exc``, raised by user code (the factory, a hook, a
    handler), records; None if it must go on (the caller re-raises it).

    An ``Exception`` is itself the failure; a stray ``Cancelled`` (see
    :func:`stray_cancellation`) fails as a RuntimeError that says so; a
    real cancellation, ``KeyboardInterrupt``, ``SystemExit`` and the like
    go on. (``type()``: an exception's ``__class__`` may raise.)
    """
    if issubclass(type(exc), Exception):
        return exc
    return stray_cancellation(exc)


def stray_cancellation(exc: BaseException) -> RuntimeError | None:
    """The failure to record if ``exc``, raised by user code, is a cancellation not for us.

    A handler can catch a ``trio.Cancelled`` inside a cancel scope (or a
    nursery) of its own and raise it again outside that scope. No scope of
    the actor's catches it then: it would end the actor's task, and trio's
    nursery would swallow it silently, ending the supervisor while the
    system still accepts sends. Returns None if ``exc`` is no such thing
    (the caller re-raises it): not a Cancelled (nor a group of Cancelled
    and ordinary exceptions), or the calling task is cancelled indeed.
    """
    if isinstance(exc, BaseExceptionGroup):
        if exc.split((Exception, trio.Cancelled))[1] is not None:
            return None  # holds a KeyboardInterrupt, SystemExit...: not ours to judge
        if exc.subgroup(trio.Cancelled) is None:
            return None  # (an ExceptionGroup: the caller's except Exception took it)
    elif not isinstance(exc, trio.Cancelled):
        return None
    # Effectively cancelled (a kill, a timeout, the system stopping): it is ours.
    if trio.current_effective_deadline() == -math.inf:
        return None
    error = RuntimeError(
        f"the handler raised {type(exc).__name__}, a trio.Cancelled its own scope did not cause "
        "(a Cancelled caught inside a cancel scope or nursery must not be raised outside it)"
    )
    error.__cause__ = exc
    return error


class Exit(enum.Enum):
    """Why an incarnation ended."""

    IDLE = "idle"  # no work for idle_timeout, or others wait for a slot
    YIELD = "yield"  # used its fair share while others wait; has more work
    WAIT = "wait"  # the head waits for its retry time; the timer brings it back
    STOP = "stop"  # the system is stopping
    CRASH = "crash"  # handler raised, timed out, was killed, or a hook failed
    START_FAILED = "start failed"  # (internal) the factory or started() raised
    TIMEOUT = "timeout"  # (internal to _serve) the handler outlived handler_timeout


class Phase(enum.Enum):
    """Where a session actor is. The legal changes are :data:`TRANSITIONS`."""

    NEW = "new"  # registered; its task has not run yet
    STARTING = "starting"  # builds an instance, loads the state, runs started()
    CLAIMING = "claiming"  # a claim of the session's head (with the previous ack) commits
    HOLDING = "holding"  # holds a claimed message whose handler has not started
    RUNNING = "running"  # the handler runs (handler_timeout applies)
    ACKING = "acking"  # waits for its ack to commit (before an answer, a leave, isolation)
    EMITTING = "emitting"  # waits for subscribers to take the handler's result
    IDLE = "idle"  # nothing to do: parked until a notice, a handoff or a wake-up
    HANDOFF = "handoff"  # waits for messages being inserted claimed for it
    ISOLATION = "isolation"  # waits while a crash suspect runs alone, or to run one alone
    DUE = "due"  # waits (keeping its slot) for its head's retry time, which is near
    STOPPING = "stopping"  # runs the instance's stopped() hook
    FAILING = "failing"  # records a crash: fails the attempt, gives back what it holds
    BACKOFF = "backoff"  # waits out the restart delay before the next incarnation
    RELEASING = "releasing"  # gives back the messages it holds (they were not started)
    LEFT = "left"  # out of the registry; its task ends

    # Enum's own __hash__ is a Python function (hash of the name); _to()
    # hashes the phase twice per change, three changes per message. Members
    # are singletons compared by identity, so the identity hash agrees.
    __hash__ = object.__hash__


# Phases of serving (an incarnation between started() and its end): the
# router may hand such an actor messages claimed on delivery.
SERVING = frozenset(
    {
        Phase.CLAIMING,
        Phase.HOLDING,
        Phase.RUNNING,
        Phase.ACKING,
        Phase.EMITTING,
        Phase.IDLE,
        Phase.HANDOFF,
        Phase.ISOLATION,
        Phase.DUE,
    }
)
# Anywhere a kill, a handler timeout or a hard stop can land (an await
# inside an incarnation's cancel scope).
_CANCELLABLE = SERVING | {Phase.STARTING, Phase.STOPPING, Phase.RELEASING}

# {phase: the phases it may change to}. docs/architecture.md prints this
# table; tests/test_architecture.py checks that the two agree.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.STARTING, Phase.RELEASING}),
    Phase.STARTING: frozenset(
        {Phase.CLAIMING, Phase.HOLDING, Phase.HANDOFF, Phase.ISOLATION, Phase.RELEASING}
        | {Phase.STOPPING, Phase.FAILING}
    ),
    Phase.CLAIMING: frozenset(
        {Phase.HOLDING, Phase.IDLE, Phase.ISOLATION, Phase.DUE, Phase.CLAIMING}
        | {Phase.HANDOFF, Phase.ACKING, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.HOLDING: frozenset({Phase.RUNNING, Phase.RELEASING, Phase.FAILING}),
    Phase.RUNNING: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.IDLE, Phase.ACKING, Phase.EMITTING}
        | {Phase.HANDOFF, Phase.ISOLATION, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.ACKING: frozenset(
        {Phase.EMITTING, Phase.HOLDING, Phase.CLAIMING, Phase.IDLE, Phase.HANDOFF}
        | {Phase.ISOLATION, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.EMITTING: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.IDLE, Phase.ACKING, Phase.HANDOFF}
        | {Phase.ISOLATION, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.IDLE: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.HANDOFF, Phase.ISOLATION, Phase.ACKING}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.HANDOFF: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.ISOLATION, Phase.HANDOFF, Phase.ACKING}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.ISOLATION: frozenset(
        {Phase.CLAIMING, Phase.HOLDING, Phase.HANDOFF, Phase.ACKING, Phase.ISOLATION}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.DUE: frozenset(
        {Phase.CLAIMING, Phase.HOLDING, Phase.HANDOFF, Phase.ISOLATION, Phase.ACKING}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.STOPPING: frozenset({Phase.STARTING, Phase.FAILING, Phase.RELEASING, Phase.LEFT}),
    Phase.FAILING: frozenset(
        {Phase.STARTING, Phase.BACKOFF, Phase.RELEASING, Phase.FAILING, Phase.LEFT}
    ),
    Phase.BACKOFF: frozenset({Phase.STARTING, Phase.RELEASING, Phase.LEFT}),
    Phase.RELEASING: frozenset(
        {Phase.STOPPING, Phase.STARTING, Phase.ISOLATION, Phase.FAILING, Phase.RELEASING}
        | {Phase.LEFT}
    ),
    Phase.LEFT: frozenset(),
}


class TransitionError(BaseException):
    """A session actor was asked to change phase against :data:`TRANSITIONS`: a bug of ours.

    Not an ``Exception``: no path that records a handler's failure may take
    it for one. It ends the actor's task (its messages go back to pending)
    and fails the system, whose ``async with`` raises it.
    """

    def __init__(self, session_id: str, old: Phase, new: Phase) -> None:
        super().__init__(f"session {session_id!r}: illegal phase change {old.value} -> {new.value}")


class Step(enum.Enum):
    """What a serving actor does next (SessionActor._next_step)."""

    STOP = "stop"  # the system stops: flush the ack, give back what it holds
    YIELD = "yield"  # its fair share is used and others wait: leave for the back of the line
    END_ISOLATION = "end isolation"  # the suspect it ran alone is done: let others claim
    WAIT_ISOLATION = "wait isolation"  # another actor runs a suspect alone: hold nothing, wait
    WAIT_HANDOFF = "wait handoff"  # messages are being inserted claimed for it
    TAKE_HANDED = "take handed"  # run the next message it was handed
    LOAD_AND_TAKE = "load and take"  # the same, handed before the state was loaded
    CLAIM = "claim"  # claim the session's head from the database
    NEXT = "next"  # (after a step) decide again
    AWAIT_WORK = "await work"  # (after a step) nothing to do: wait for work


class Cancel(enum.Enum):
    """Why the incarnation's cancel scope was cancelled (a kill wins over a timeout)."""

    KILLED = "killed"
    TIMED_OUT = "timed out"


# The members the per-message path reads, as module globals: Python 3.11
# reads ``Phase.RUNNING`` through EnumType.__getattr__'s hook, a bound
# method made and called per read, several times per message
# (docs/performance.md, "What the redesign of issue 17 costs").
_HOLDING, _RUNNING, _CLAIMING, _IDLE = Phase.HOLDING, Phase.RUNNING, Phase.CLAIMING, Phase.IDLE
_TAKE_HANDED, _CLAIM, _NEXT, _AWAIT_WORK = Step.TAKE_HANDED, Step.CLAIM, Step.NEXT, Step.AWAIT_WORK
_TIMED_OUT = Cancel.TIMED_OUT


@attrs.frozen
class SessionActorStatistics:
    """One session actor right now."""

    session_id: str
    phase: str  # Phase.value
    in_flight: int | None  # the id of the message it holds
    handler_running: bool
    idle: bool
    caught_up: bool
    claimed_seq: int
    notified_seq: int
    handed: int  # messages claimed on delivery, queued behind the one in flight
    turn: int  # messages processed in this activation
    parked: bool  # waiting for work (its task parked until someone brings it)


class _Serving:
    """One serving period's working set (SessionActor._serve).

    It also holds what the per-message path reads of the host, read once
    per period: each read of the host is an attribute lookup, and the ack's
    callback a bound method made anew, per message.
    """

    __slots__ = (
        "ack",
        "acked",
        "alone",
        "ctx",
        "data",
        "handle",
        "instance",
        "starts",
        "store",
        "timeout",
        "trio_time",
        "watchdog",
    )

    def __init__(
        self, host: ActorHost, instance: Instance, data: SessionData, ctx: Any, has_slot: bool
    ) -> None:
        self.instance = instance
        store = self.store = host.store
        # The start table, if this actor has a slot in it.
        self.starts: StartMarks | None = store.starts if has_slot else None
        self.data = data
        self.ctx = ctx
        function = host.behaviour.function
        self.handle: Callable[[Any, Message], Awaitable[Any]] = (
            function if function is not None else instance.handle
        )
        self.acked = host.on_acks_committed
        self.timeout = host.config.handler_timeout
        self.watchdog = host.watchdog
        self.trio_time = host.clock.trio_time
        # The previous message's ack when it is not yet submitted: it goes
        # with the next claim, or is flushed before a wait.
        self.ack: int | Ack | None = None
        self.alone = False  # this actor holds the isolation (see Supervisor.isolate)


class SessionActor:
    """A session's slot in the registry: its phase, its handed messages and its incarnations."""

    def __init__(self, session_id: str, host: ActorHost) -> None:
        self.session_id = session_id
        self._host = host
        self.phase = Phase.NEW  # changed only by _to()
        # The claimed message a handler is (about to be) running, until its
        # ack commits. Set and cleared only right after a store call returns,
        # so it agrees with the database: whatever ends the incarnation, this
        # is the message to fail or release. (The host's busy count follows it.)
        self._in_flight: Message | None = None
        # Whether in_flight's attempt is spent: its handler started (a kill
        # before that gives the attempt back).
        self.handler_started = False
        # The live incarnation's cancel scope (None between incarnations):
        # kill() and time_out() cancel it, and only it; _cancel says which.
        self._scope: trio.CancelScope | None = None
        self._cancel: Cancel | None = None
        self._failure: BaseException | None = None
        # The failure and its text, when the text was made where it was
        # caught (a failing started() logs it); else _after_crash makes it.
        self._failure_text: tuple[BaseException, FailureText] | None = None
        # Cancelled to cut a backoff or due wait short (stop, a waiter, a wake-up).
        self._wait_scope: trio.CancelScope | None = None
        # The task while it waits for work (parked: no scope, no channel);
        # unpark() reschedules it; the IdleWatch does at idle_deadline.
        self._parked: trio.lowlevel.Task | None = None
        self.idle_deadline = math.inf
        self.idle_watched = False  # the IdleWatch's heap has an entry for this actor
        self.claimed_seq = 0  # highest seq claimed: notices at or below it are stale
        self.notified_seq = 0  # highest seq the router announced
        # Whether every message of the session in the database up to
        # claimed_seq is known to be handled: false until a claim found no
        # head in this incarnation (a new incarnation knows nothing).
        self.caught_up = False
        # Claim on delivery: reserved while the router commits messages
        # inserted claimed for this actor; handed once committed, in seq
        # order, until the actor takes each in turn. While either is set the
        # actor does not leave the registry. Invariant: handed messages are
        # in flight in the database and come after every message of the
        # session this actor has not handled yet; whatever ends an
        # incarnation gives them back (_release_handed) before any claim.
        self.reserved = False
        self.handed: deque[Message] = deque()
        # The task while it waits for its reservation to settle
        # (_wait_handoff); take_handoff() reschedules it, as unpark() does.
        self._handoff_waiter: trio.lowlevel.Task | None = None
        # Serving periods (one per _serve call) and the one a reservation was
        # made in. A handoff is taken only in the period it was reserved in:
        # the store judged "nothing of the session pending" at insert time,
        # and a crash since (the message in flight failed back to pending)
        # may have made that false.
        self._serve_gen = 0
        self._reserve_gen = -1
        # This actor's slot in the start table (see _starts.py).
        starts = host.store.starts
        self.slot = starts.acquire() if starts is not None else -1
        # handler_timeout (see Watchdog): set before each handler call.
        self.handler_deadline = math.inf
        self.watched = False  # the Watchdog's heap has an entry for this actor
        self.turn = 0  # messages processed since this activation (fair share)
        self.wait_until: float | None = None  # epoch time the head waits for (Exit.WAIT)

    def _to(self, phase: Phase) -> None:
        """Change phase: the one place that does, and it asserts the change is legal."""
        if phase not in TRANSITIONS[self.phase]:
            raise TransitionError(self.session_id, self.phase, phase)
        self.phase = phase

    def statistics(self) -> SessionActorStatistics:
        """A snapshot of this actor."""
        return SessionActorStatistics(
            session_id=self.session_id,
            phase=self.phase.value,
            in_flight=self._in_flight.id if self._in_flight is not None else None,
            handler_running=self.handler_running,
            idle=self.idle,
            caught_up=self.caught_up,
            claimed_seq=self.claimed_seq,
            notified_seq=self.notified_seq,
            handed=len(self.handed),
            turn=self.turn,
            parked=self._parked is not None,
        )

    @property
    def in_flight(self) -> Message | None:
        """The claimed message this actor holds, if any."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, msg: Message | None) -> None:
        if (msg is None) != (self._in_flight is None):
            self._host.busy.add(1 if msg is not None else -1)
        self._in_flight = msg

    @property
    def handler_running(self) -> bool:
        """The handler runs now (the Watchdog times it)."""
        return self.phase is Phase.RUNNING

    @property
    def serving(self) -> bool:
        """Between started() and the end of the incarnation."""
        return self.phase in SERVING

    # -- called by router / supervisor (sync, trio thread) ---------------

    def notify(self, seq: int) -> None:
        """Work up to ``seq`` is committed. Never blocks.

        A busy actor will claim again when its handler returns, so only a
        parked actor is woken, and only for work beyond what it claimed;
        ``notified_seq`` keeps the highest seq either way.
        """
        if seq > self.notified_seq:
            self.notified_seq = seq
            if self._parked is not None and seq > self.claimed_seq:
                self.unpark()

    def wake(self) -> None:
        """Cut an idle, due or backoff wait short, so the actor looks again."""
        if self._parked is not None:
            self.unpark()
        elif self._wait_scope is not None:
            self._wait_scope.cancel()

    def _abort_park(self, _: object) -> trio.lowlevel.Abort:
        # The parked task is cancelled (a kill, or the system stopping hard).
        self._parked = None
        self._host.idle_actors.discard(self)
        return trio.lowlevel.Abort.SUCCEEDED

    @property
    def parked(self) -> bool:
        """Waiting for work."""
        return self._parked is not None

    def unpark(self) -> None:
        """End the wait for work; the actor looks at what it has."""
        task = self._parked
        if task is not None:
            self._parked = None
            self._host.idle_actors.discard(self)
            trio.lowlevel.reschedule(task, WOKEN)

    @property
    def idle(self) -> bool:
        """Waiting for work (not running a handler, not between incarnations)."""
        return (self._parked is not None or self._wait_scope is not None) and (
            self.in_flight is None
        )

    def time_out(self) -> None:
        """The running handler passed its deadline (Watchdog): cancel it.

        It cancels the incarnation's scope, as kill() does; ``_cancel`` tells
        the two apart (_incarnation).
        """
        if self.phase is Phase.RUNNING and self._scope is not None and self._cancel is None:
            self._cancel = Cancel.TIMED_OUT
            self._scope.cancel()

    def kill(self) -> bool:
        """Crash the live incarnation now. Returns False if none is running."""
        if self._scope is None or self._cancel is Cancel.KILLED:
            return False
        self._cancel = Cancel.KILLED
        self._scope.cancel()
        return True

    def has_new_work(self) -> bool:
        """True if work came beyond what was claimed: handed, reserved or announced."""
        return bool(self.reserved or self.handed or self.notified_seq > self.claimed_seq)

    # -- the actor's task ---------------------------------------------------

    async def run(self) -> None:
        """Incarnations until the session is idle, waits, yields, or the system stops."""
        host = self._host
        task = trio.lowlevel.current_task()
        host.actor_tasks[task] = self  # (once per activation: see System._calling_actor)
        # One frame, not a wrapper around the loop: every resumption of the
        # actor's task walks its chain of coroutines.
        try:
            while True:
                outcome: Exit | None = await self._incarnation()
                if outcome is Exit.CRASH or outcome is Exit.START_FAILED:
                    outcome = await self._recover(outcome is Exit.START_FAILED)
                if outcome is not None and host.retire(self, outcome):
                    self._to(Phase.LEFT)
                    return
        except BaseException as exc:
            # Cancelled by a hard stop (or the system failing): the message
            # goes back to the head of its queue for the next start. If its
            # handler started, the attempt stays counted, so the redelivery
            # says attempt > 1. Anything else escaping a handler
            # (KeyboardInterrupt, SystemExit) is treated like a dead process.
            await self._release_in_flight(crashed=not isinstance(exc, trio.Cancelled))
            host.forget(self)
            self._to(Phase.LEFT)
            raise
        finally:
            del host.actor_tasks[task]

    async def _recover(self, start_failed: bool) -> Exit | None:
        """After a crash: record it, then how to leave (None: start again now)."""
        host = self._host
        delay, nothing_to_start = await self._after_crash(start_failed)
        if host.stopping:
            await self._release_in_flight()
            return Exit.STOP
        if nothing_to_start:
            return Exit.IDLE  # (it stays if work came: retire() says)
        if delay > 0 and (delay > host.config.idle_timeout or host.line.has_waiters):
            # Leave the slot. The wait must be on the head in the database,
            # or nothing would bring the session back.
            if self.wait_until is None:
                until = host.clock.now() + delay
                store = host.store
                if await store.defer_head(self.session_id, until):
                    self.wait_until = until
            return Exit.IDLE if self.wait_until is None else Exit.WAIT
        self._to(Phase.BACKOFF)
        await self._wait(delay)
        if not host.stopping:
            return None
        return Exit.STOP  # (woken by the stop: no instance to start for it)

    async def _incarnation(self) -> Exit:
        host = self._host
        self._to(Phase.STARTING)
        data = SessionData(
            self.session_id, host.clock.now, host.outputs, host.store.max_value_bytes
        )
        ctx = host.new_context(data)
        self._cancel = None
        self._failure = None
        self._failure_text = None
        self.turn = 0
        self.caught_up = False
        outcome = Exit.CRASH
        instance: Instance | None = None
        # One cancel scope per incarnation, cancelled by kill() and by the
        # Watchdog's time_out() alike: a scope is not cheap (a CancelStatus,
        # a context manager, the deadline bookkeeping), and an activation
        # would pay for a second one.
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                instance = await self._start_instance(data, ctx)
                outcome = await self._serve(instance, data, ctx)
            except StoreError:
                raise
            except BaseException as exc:  # the factory or started() failed: a crash
                outcome = self._start_failed(exc)
            else:
                if outcome is not Exit.CRASH and outcome is not Exit.TIMEOUT:
                    await self._stop_instance(instance, ctx)
            finally:
                self._scope = None
                host.end_isolation(self)
        if scope.cancelled_caught or outcome is Exit.TIMEOUT:
            # Cancelled by kill() or by time_out() (a kill wins); or the
            # handler timed out as it raised or returned (Exit.TIMEOUT).
            outcome = Exit.CRASH
            if self._cancel is Cancel.TIMED_OUT:
                assert instance is not None  # (only a running handler times out)
                killed = await self._stop_timed_out(instance, ctx)
            else:
                # A kill; but one that lands in stopped() after the handler
                # raised does not hide the handler's own error.
                killed = self._failure is None
            if killed:
                self._failure = ActorKilledError(f"actor of session {self.session_id!r} was killed")
        return outcome

    async def _start_instance(self, data: SessionData, ctx: Any) -> Instance:
        host = self._host
        behaviour = host.behaviour
        instance = behaviour.new_instance()
        if behaviour.loads_state_at_start:
            # started() may read the state: load it now. The dict it sees is
            # the state for the whole incarnation: a reference kept from
            # started() is the state handle() sees, and what started()
            # changes is committed with the next message's ack. (If started()
            # used it, every ack compares it: a kept reference may change it
            # unseen.)
            store = host.store
            data.load(await store.load_state(self.session_id))
        await instance.started(ctx)
        host.on_actor_started(self)
        return instance

    def _start_failed(self, exc: BaseException) -> Exit:
        """The factory or started() raised ``exc``: log it, and say so (or re-raise)."""
        failure = failure_of(exc)
        if failure is None:
            raise exc
        text = describe(failure)
        self._failure_text = (failure, text)
        log.error("starting the actor of session %r failed:\n%s", self.session_id, text.report)
        self._failure = failure
        return Exit.START_FAILED

    async def _stop_timed_out(self, instance: Instance, ctx: Any) -> bool:
        """After a handler timeout: record it, and run stopped() in a scope a kill reaches.

        Returns True if a kill cancelled stopped() (the attempt ends killed).
        """
        timeout = self._host.config.handler_timeout
        self._failure = HandlerTimeoutError(
            f"handler ran longer than handler_timeout={timeout}s and was cancelled"
        )
        with trio.CancelScope() as stopping:
            self._scope = stopping
            try:
                await self._stop_instance(instance, ctx)
            finally:
                self._scope = None
        return stopping.cancelled_caught

    async def _stop_instance(self, instance: Instance, ctx: Any) -> None:
        self._to(Phase.STOPPING)
        try:
            await instance.stopped(ctx)
        except BaseException as exc:
            failure = failure_of(exc)
            if failure is None:
                raise
            log.error(  # (describe(): the exception may misbehave, or be huge)
                "stopped() hook of session %r raised; ignored:\n%s",
                self.session_id,
                describe(failure).report,
            )

    async def _serve(self, instance: Instance, data: SessionData, ctx: Any) -> Exit:
        # The incarnation's cancel scope serves every handler call of it as
        # its timeout: the host's Watchdog cancels it (time_out()) when a
        # running handler passes its deadline, and _incarnation tells that
        # from a kill (a scope per message, or a deadline moved around each
        # call, would cost more than the rest of the message's way through
        # the actor). Returns Exit.TIMEOUT if the handler timed out but the
        # cancellation did not propagate (it raised or returned as it came).
        serving = _Serving(self._host, instance, data, ctx, self.slot >= 0)
        try:
            while True:
                step = self._next_step(serving)
                if step is _TAKE_HANDED:
                    nxt: Message | Step | Exit | None = self._take_handed(serving)
                elif step is _CLAIM:
                    nxt = await self._claim(serving)
                else:
                    nxt = await self._between(step, serving)
                if type(nxt) is Message:
                    nxt = await self._run_handler(serving, nxt)
                if nxt is _AWAIT_WORK:
                    # Here, not deeper: the frames of the last message (its
                    # body, its handler's result, the claim it came with)
                    # are gone, so an idle actor keeps only its state.
                    nxt = await self._await_work()
                if isinstance(nxt, Exit):
                    return nxt
        finally:
            # No more handoffs from this period: whatever comes next claims
            # from the database (handed messages are given back first).
            self._serve_gen += 1
            self.caught_up = False

    def _next_step(self, serving: _Serving) -> Step:
        """What to do next, decided without waiting (the serve loop does the waiting)."""
        host = self._host
        if host.stopping:
            return Step.STOP
        if self.turn >= host.config.fair_share and host.line.has_waiters:
            # Its turn is up (counted since this activation, the messages
            # handed to it included): to the back of the line.
            return Step.YIELD
        if serving.alone and serving.ack is not None:
            return Step.END_ISOLATION  # the suspect ran: let the others go on
        isolating = host.isolation.holder
        if isolating is not None and isolating is not self:
            return Step.WAIT_ISOLATION
        if self.reserved:
            # Messages are being inserted claimed for this actor: a claim now
            # would find them in flight. Wait until they are handed.
            return Step.WAIT_HANDOFF
        if self.handed:
            # Handed before this incarnation's first claim: the state first.
            return _TAKE_HANDED if serving.data.state is not None else Step.LOAD_AND_TAKE
        return _CLAIM

    async def _between(self, step: Step, serving: _Serving) -> Message | Step | Exit:
        """Carry out a step other than taking a handed message or claiming."""
        if step is Step.LOAD_AND_TAKE:
            return await self._take_first_handed(serving)
        if step is Step.STOP:
            await self._flush_ack(serving)
            await self._release_in_flight()
            return Exit.STOP
        if step is Step.YIELD:
            await self._flush_ack(serving)
            await self._release_handed()  # not started: the next activation claims them
            return Exit.YIELD
        if step is Step.END_ISOLATION:
            await self._flush_ack(serving)
            self._host.end_isolation(self)
            serving.alone = False
        elif step is Step.WAIT_ISOLATION:
            await self._flush_ack(serving)
            # Nothing of ours may be in flight while a suspect runs alone:
            # give handed messages back (reserve() refuses now).
            if self.reserved:
                await self._wait_handoff()
            await self._release_handed()
            self._to(Phase.ISOLATION)
            await self._host.wait_isolation(self)
        else:
            assert step is Step.WAIT_HANDOFF
            if serving.ack is not None:
                # The message that just returned is done: its ack goes now,
                # pipelined, so a kill during the wait cannot fail it.
                serving.store.ack_soon(serving.ack, serving.acked)
                serving.ack = None
                self.in_flight = None
            await self._wait_handoff()
        return Step.NEXT

    def _take_handed(self, serving: _Serving) -> Message:
        """Take the next handed message: claimed on delivery, nothing before it in the database.

        Synchronous (the state is loaded): a message handed to a running
        actor costs no coroutine to take.
        """
        if serving.ack is not None:
            serving.store.ack_soon(serving.ack, serving.acked)
            serving.ack = None
        self._to(_HOLDING)
        msg = self.handed.popleft()
        if self._in_flight is None:  # (the in_flight setter, inline: per message)
            self._host.busy.add(1)
        self._in_flight = msg
        if msg.id > self.claimed_seq:
            self.claimed_seq = msg.id
        return msg

    async def _take_first_handed(self, serving: _Serving) -> Message:
        """Take a message handed before this incarnation's first claim: load the state first."""
        assert serving.ack is None  # (nothing ran in this incarnation yet)
        self._to(Phase.HOLDING)
        msg = self.in_flight = self.handed[0]  # held while the state loads
        store = self._host.store
        serving.data.load(await store.load_state(self.session_id))
        self.handed.popleft()
        if msg.id > self.claimed_seq:
            self.claimed_seq = msg.id
        return msg

    async def _claim(self, serving: _Serving) -> Message | Step | Exit:
        """Claim the session's head (acking the previous message in the same transaction)."""
        host = self._host
        store = host.store
        announced = self.notified_seq  # committed before this claim runs
        self._to(_CLAIMING)
        ack, data = serving.ack, serving.data
        claim: Claim = await store.claim_next(
            self.session_id,
            ack,
            host.clock.now(),
            host.config.max_attempts,
            serving.alone,
            data.state is None,
            self._bulk(serving.alone),
        )
        # Committed: the ack (if any) and the claim (if any). Record both
        # before the next checkpoint, so a kill sees the truth. (The ack's
        # outbox first: drain() must not see zero between.)
        if claim.sent:
            host.on_sent(claim.sent)
        if ack is not None:
            host.on_acked()
            serving.ack = None
        self.in_flight = claim.message
        if claim.dead:
            host.on_dead_lettered(
                self.session_id, len(claim.dead), claim.dead, "its attempts ran out"
            )
        if data.state is None:
            data.load(claim.state)
        msg = claim.message
        if msg is None:
            if serving.alone:  # nothing to run alone after all
                host.end_isolation(self)
                serving.alone = False
            return await self._claimed_nothing(serving, claim, announced)
        if claim.extra:
            # Claimed with it, and before anything handed meanwhile (a
            # handoff's insert was queued after this claim).
            self.handed.extendleft(reversed(claim.extra))
        # Nothing queued behind it: once it is handled, everything of the
        # session up to here is, and the router's notices tell of anything
        # later (so handoffs may start).
        self.caught_up = not claim.more
        if claim.seq > self.claimed_seq:
            self.claimed_seq = claim.seq
        self._to(_HOLDING)
        return msg

    async def _claimed_nothing(
        self, serving: _Serving, claim: Claim, announced: int
    ) -> Step | Exit:
        """The claim found no message to run: isolate, wait for the head, or wait for work."""
        host = self._host
        # The claim saw everything announced before it: caught up.
        self.claimed_seq = max(self.claimed_seq, announced)
        self.caught_up = claim.wait_until is None and not claim.alone
        if claim.alone:
            self._to(Phase.ISOLATION)
            await host.isolate(self)
            serving.alone = True
            return Step.NEXT
        if claim.wait_until is not None:
            delay = host.clock.to_trio(claim.wait_until) - trio.current_time()
            if delay > host.config.idle_timeout or host.line.has_waiters:
                self.wait_until = claim.wait_until
                return Exit.WAIT
            self._to(Phase.DUE)
            await self._wait(delay)
            return Step.NEXT
        return _AWAIT_WORK

    async def _run_handler(self, serving: _Serving, msg: Message) -> Step | Exit:
        """Run the handler on ``msg`` (held, claimed); then ack it as the next step allows."""
        host = self._host
        self.handler_started = False
        if host.stopping:
            await self._release_in_flight()
            return Exit.STOP
        await trio.lowlevel.checkpoint_if_cancelled()
        self.handler_started = True
        if serving.starts is not None:
            serving.starts.mark(self.slot, msg.id)  # before the handler: survives a crash
        timeout = serving.timeout
        observer = host.observer
        started_at = 0.0
        if timeout is not None or observer is not None:
            started_at = serving.trio_time()
            if timeout is not None:
                self.handler_deadline = started_at + timeout
                serving.watchdog.watch(self)
        self._to(_RUNNING)
        data = serving.data
        data.message = msg
        try:
            result = await serving.handle(serving.ctx, msg)
            # What the ack writes: the id alone unless the handler touched
            # state or the outbox, or the message has a key (then an Ack;
            # raises if the state cannot be committed).
            done = (
                data.ack(msg)
                if data.state_used or data.outbox is not None or msg.key is not None
                else msg.id
            )
        except BaseException as exc:
            data.message = None
            return await self._handler_failed(serving, exc)
        data.message = None
        # (A Cancelled from the watchdog propagates to the incarnation's scope.)
        if self._cancel is _TIMED_OUT:
            # The watchdog cancelled it just as it returned: it did outlive
            # handler_timeout, and the scope is spent.
            return Exit.TIMEOUT
        if observer is not None:
            observer(msg, serving.trio_time() - started_at)
        serving.ack = done
        if (host.replies and msg.id in host.replies) or (
            result is not None and host.outputs.listening(self.session_id)
        ):
            await self._answer_and_publish(serving, msg, result)
        return self._handled(serving)

    async def _handler_failed(self, serving: _Serving, exc: BaseException) -> Exit:
        # An Exception fails the attempt, and so does a Cancelled that is
        # not for this task (caught by the handler from an inner scope and
        # raised again outside it): let through, no scope of ours would
        # catch it, and the supervisor's nursery would end quietly.
        # KeyboardInterrupt and the like (and a real cancellation) go on.
        failure = failure_of(exc)
        if failure is None:
            raise exc
        if self._cancel is Cancel.TIMED_OUT:
            return Exit.TIMEOUT  # the watchdog cancelled it as it raised
        self._failure = failure
        await self._stop_instance(serving.instance, serving.ctx)
        return Exit.CRASH

    async def _answer_and_publish(self, serving: _Serving, msg: Message, result: Any) -> None:
        """The handler returned and an ask waits for ``msg``, or someone listens to the outputs."""
        host = self._host
        if host.replies and msg.id in host.replies:
            # An ask waits for this message: it gets the result once the ack
            # has committed (not pipelined), so a reply says the state and
            # the outbox are durable. (The call is shielded: a kill
            # meanwhile lands after the answer.)
            await self._flush_ack(serving)
            host.answer(msg.id, result)
        if result is not None and host.outputs.listening(self.session_id):
            # Backpressure: wait for the slowest subscriber. (A kill here
            # drops the ack: the message runs again, as after any kill.)
            self._to(Phase.EMITTING)
            await host.outputs.publish(self.session_id, result)

    def _handled(self, serving: _Serving) -> Step:
        """The handler returned (answered, published): pipeline the ack; what next.

        Synchronous: with no ask waiting and nobody listening, a message's
        way from its handler's return to the next decision has no await.
        """
        host = self._host
        self.turn += 1
        if not (self.caught_up and self.notified_seq <= self.claimed_seq and not serving.alone):
            return _NEXT  # the ack goes with the next claim, or before the next wait
        # Nothing is known to follow: commit the ack without waiting for it
        # (no claim that would find nothing), and wait for work. The store
        # commits operations in order, so any later claim of this session
        # commits after this ack.
        ack = serving.ack
        if ack is not None:
            if self._in_flight is not None:  # (the in_flight setter, inline)
                host.busy.add(-1)
                self._in_flight = None
            serving.store.ack_soon(ack, serving.acked)
            serving.ack = None
        if self.handed and not host.stopping:
            # The next message is here already: no wait, and no checkpoint
            # (the queue is bounded, and the router only refills it when
            # this task yields).
            return _NEXT
        return _AWAIT_WORK

    def _bulk(self, alone: bool) -> int:
        """How many messages behind the head a claim may take too (see Store.claim_next)."""
        if alone:
            return 0  # a crash suspect runs alone: nothing else of ours in flight
        host = self._host
        mailbox_size = host.config.mailbox_size
        if host.line.has_waiters:  # no more than this turn will run before it yields
            return max(0, min(mailbox_size, host.config.fair_share - self.turn - 1))
        return mailbox_size

    async def _flush_ack(self, serving: _Serving) -> None:
        """Commit the pending ack (if any) and wait for it."""
        ack = serving.ack
        if ack is None:
            return
        serving.ack = None
        self._to(Phase.ACKING)
        host = self._host
        sent = await host.store.ack(ack)
        self.in_flight = None
        if sent:  # first: drain() must not see zero between
            host.on_sent(sent)
        host.on_acked()

    # KI-protected: a KeyboardInterrupt between registering the task and
    # parking it would leave the registration behind, and the task would be
    # rescheduled after it exited (TrioInternalError). Protected, trio
    # delivers it at the wait instead (the wait's abort undoes the
    # registration). tests/test_adversarial_trio.py injects it at each line.
    @trio.lowlevel.enable_ki_protection
    async def _await_work(self) -> Exit | None:
        """Nothing to do: wait for work beyond what was claimed, or a handoff.

        Returns how to leave instead, if the actor should: the system stops,
        others wait for a slot, or ``idle_timeout`` passed (or wake() cut the
        wait short) with nothing new. One coroutine, not two: an idle
        actor's wait is once per message, and what it allocates is what
        Python's collector promotes while the actor waits.
        """
        host = self._host
        if host.line.has_waiters:
            return Exit.STOP if host.stopping else Exit.IDLE
        self._to(_IDLE)
        if self.handed or self.notified_seq > self.claimed_seq:
            await trio.lowlevel.checkpoint()
            return None
        if host.stopping:  # stop() may have woken us before we got here
            await trio.lowlevel.checkpoint()
            return Exit.STOP
        self.idle_deadline = host.clock.trio_time() + host.config.idle_timeout
        host.idle_watch.watch(self)
        self._parked = trio.lowlevel.current_task()
        host.idle_actors.add(self)
        await trio.lowlevel.wait_task_rescheduled(self._abort_park)
        if self.handed or self.notified_seq > self.claimed_seq:
            return None
        return Exit.STOP if host.stopping else Exit.IDLE

    # -- claim on delivery (Supervisor.reserve / hand_over) ---------------

    def can_take_handoff(self) -> bool:
        """Serving: the router may insert this session's next messages claimed.

        Busy, idle or claiming alike: handed messages queue behind the one in
        flight (up to ``mailbox_size``). A claim under way was queued in the
        store before the insert, so it cannot see them; and the store inserts
        them claimed only if nothing of the session is pending, so they never
        overtake a message in the database (Store.append).
        """
        return (
            self.phase in SERVING
            and not self.reserved
            and len(self.handed) < self._host.config.mailbox_size
        )

    def reserve(self) -> None:
        """Claimed messages are on their way: do not leave before they come.

        (The idle wait may still time out meanwhile: the actor then finds
        itself reserved, and retire() refuses to let it go.)
        """
        self.reserved = True
        self._reserve_gen = self._serve_gen

    @trio.lowlevel.enable_ki_protection  # (as _await_work: registers, then parks)
    async def _wait_handoff(self) -> None:
        """Wait until the reservation (``self.reserved``) is settled by take_handoff()."""
        self._to(Phase.HANDOFF)
        self._handoff_waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_handoff_wait)

    def _abort_handoff_wait(self, _: object) -> trio.lowlevel.Abort:
        # The waiting task is cancelled (a kill, or the system stopping hard).
        self._handoff_waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def take_handoff(self, msgs: list[Message]) -> bool:
        """Receive the messages inserted claimed for this actor, and wake up.

        False if the actor stopped serving since the reservation (it crashed,
        or is leaving): the caller gives the claims back.
        """
        if not self.reserved:
            return False
        self.reserved = False
        waiter = self._handoff_waiter
        if waiter is not None:
            self._handoff_waiter = None
            trio.lowlevel.reschedule(waiter, WOKEN)
        if not msgs:
            return True  # none was inserted claimed after all
        if self.phase not in SERVING or self._reserve_gen != self._serve_gen:
            return False  # it stopped serving since: they may overtake a failed message
        self.handed.extend(msgs)
        self.claimed_seq = max(self.claimed_seq, msgs[-1].id)
        if self._parked is not None:
            # Rescheduling a parked task is far cheaper than cancelling a
            # wait's scope (an exception, its unwinding, and trio's cancel
            # bookkeeping, once per message).
            self.unpark()
        return True

    async def _release_handed(self) -> None:
        """Give back every handed message (they were never started)."""
        if not self.handed:
            return
        self._to(Phase.RELEASING)
        ids = [m.id for m in self.handed]
        self.handed.clear()
        self.caught_up = False
        # If the store failed, the rows stay in flight and are recovered
        # (attempt given back: never started) at the next start.
        with contextlib.suppress(StoreError):
            store = self._host.store
            await store.release_many(ids)

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds unless woken (stop, a waiter, an abort)."""
        if delay <= 0 or math.isnan(delay) or self._host.stopping:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(delay) as scope:
            self._wait_scope = scope
            try:
                await trio.sleep_forever()
            finally:
                self._wait_scope = None

    # -- after a crash ----------------------------------------------------

    async def _after_crash(self, start_failed: bool) -> tuple[float, bool]:
        """Record the failed attempt; return (seconds before the next incarnation,
        whether the session has nothing at all to start for).

        The failure is turned into text here, once and safely (describe():
        a user's exception may misbehave in repr() or str(), or hold text
        the database cannot store), and only that text goes on.
        """
        self._to(Phase.FAILING)
        host = self._host
        failure = self._failure or ActorKilledError("actor crashed")
        made, self._failure_text = self._failure_text, None
        text = made[1] if made is not None and made[0] is failure else describe(failure)
        msg = self.in_flight
        # A Reject from the handler dead-letters its message now. It is an
        # outcome the handler chose, not a crash: the restart policy does
        # not count it, and the next incarnation starts at once.
        rejection = rejected(failure) if msg is not None and self.handler_started else None
        if rejection is None:
            delay, _suspended = host.on_restart(self, failure, text.summary)
        else:
            delay = 0.0
            host.on_rejected(self)  # its instance is done (stopped() ran)
        await self._release_handed()
        self._to(Phase.FAILING)
        if start_failed and msg is None and not host.stopping:
            msg = await self._charge_failed_start()
            if msg is None:  # nothing due to charge: wait for the head, or leave
                if self.wait_until is None:
                    return delay, True
                now = host.clock.now()
                self.wait_until = max(self.wait_until, now + delay)
                return self.wait_until - now, False
        if msg is not None and not self.handler_started:
            await self._release_in_flight()
            self._to(Phase.FAILING)
            msg = None
        if msg is not None:
            return await self._fail_attempt(msg, failure, text, delay, rejection is None), False
        self.wait_until = None
        return delay, False

    async def _fail_attempt(
        self, msg: Message, failure: BaseException, text: FailureText, delay: float, retry: bool
    ) -> float:
        """Fail ``msg``'s attempt in the store: retry it later, or dead-letter it."""
        host = self._host
        config = host.config
        if retry:
            retry_delay = max(delay, host.retry_delay(msg.attempt))
            max_attempts = config.max_attempts
        else:
            retry_delay, max_attempts = 0.0, 0  # (rejected: Store.fail finds no attempt left)
        retry_at = host.clock.now() + retry_delay
        store = host.store
        outcome = await store.fail(msg.id, text.report, retry_at, max_attempts)
        self.in_flight = None
        host.on_attempt_failed(self.session_id, msg, failure, outcome == "dead", text)
        if outcome == "retry":
            self.wait_until = retry_at
            return retry_delay
        self.wait_until = None
        return delay

    async def _charge_failed_start(self) -> Message | None:
        """Claim the session's head message to fail it: a failed start is its attempt.

        Invariant 5 (no crash loop): a constructor or ``started()`` that
        raises at every start would otherwise restart the actor for ever,
        counting no attempt (nothing was claimed yet), its messages never
        dead-lettered and ``drain()`` never returning. Charged to the head,
        the failure retries it with backoff, and dead-letters it (with the
        start's error) after ``max_attempts``, like a handler's failure;
        then the next message. The claim is made as if alone: no handler
        runs, so a crash suspect at its last attempt need not wait for the
        system to run it alone. Returns the claimed message (in flight,
        counted as started), or None if the session has nothing due (then
        ``wait_until`` is when its head is, or None if there is nothing).
        """
        host = self._host
        store = host.store
        claim: Claim = await store.claim_next(
            self.session_id,
            None,
            host.clock.now(),
            host.config.max_attempts,
            True,
        )
        if claim.dead:
            host.on_dead_lettered(
                self.session_id, len(claim.dead), claim.dead, "its attempts ran out"
            )
        if claim.seq > self.claimed_seq:  # (as a claim in _claim: notices up to it are seen)
            self.claimed_seq = claim.seq
        if claim.message is None:
            self.wait_until = claim.wait_until
            return None
        self.in_flight = claim.message
        self.handler_started = True  # (the attempt was used: a hard stop keeps it counted)
        return claim.message

    async def _release_in_flight(self, *, crashed: bool = False) -> None:
        """Put the held messages back; an attempt is given back if no handler started."""
        self._to(Phase.RELEASING)
        await self._release_handed()
        msg = self.in_flight
        if msg is None:
            return
        self.in_flight = None
        uncount = not self.handler_started
        # If the store failed, the row stays in flight and is recovered at the next start.
        with contextlib.suppress(StoreError):
            store = self._host.store
            await store.release(msg.id, uncount, crashed and not uncount)
