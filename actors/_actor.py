"""One session's actor: claim the head message, run the handler, ack / retry / dead.

A :class:`SessionActor` lives in the supervisor's registry while its session
is active. It runs *incarnations* one after another: each incarnation is a
fresh instance of the user's actor, so a crash never leaks state into the
next attempt.

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
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._codec import check_encoded, check_session_id, decode_body, encode_body, encode_json
from ._errors import ActorKilledError, HandlerTimeoutError, StoreError
from ._failure import FailureText, describe, rejected
from ._records import Message
from ._wake import WOKEN
from .store import Ack, Claim

if TYPE_CHECKING:
    from ._supervisor import Supervisor
    from ._system import System

log = logging.getLogger("actors.actor")


class Context:
    """What a handler gets besides the message: its session, state and outbox.

    Attributes:
      session_id: the session this actor serves.
      system: the running :class:`System` (``ctx.system.send`` sends at
        once, outside the message's transaction; ``ctx.send`` is usually
        what you want).

    A context belongs to one incarnation of the session's actor: a restart
    gets a fresh one, loaded from what was committed.
    """

    __slots__ = (
        "_message",
        "_outbox",
        "_state",
        "_state_json",
        "_state_used",
        "session_id",
        "system",
    )

    def __init__(self, session_id: str, system: System) -> None:
        self.session_id = session_id
        self.system = system
        self._state: dict[str, Any] | None = None  # None until loaded
        self._state_json = "{}"  # the state as last committed (or about to be)
        self._state_used = False  # the handler may have changed it: compare at the ack
        self._outbox: list[tuple[str, str | bytes, float]] | None = None
        self._message: Message | None = None  # the message being handled

    def __repr__(self) -> str:
        return f"<Context session_id={self.session_id!r}>"

    # -- durable state ------------------------------------------------------

    @property
    def state(self) -> dict[str, Any]:
        """The session's durable state: a dict of JSON-compatible values.

        Empty for a new session. Change it in place (or assign a new dict);
        the change is committed in the same transaction as the ack of the
        message being handled, so a crash never applies a message to the
        state twice and never loses an applied change. If the handler fails
        (raises, times out, is killed), the state is as it was before the
        message. Values make a JSON round trip: tuples come back as lists,
        dict keys as strings.

        The same dict is the state from ``started`` to the end of the
        incarnation (unless you assign another): a reference kept from
        ``started`` or an earlier message is the live state, and what
        ``started`` changes is committed with the next acknowledged
        message. Changes made in ``stopped`` are never committed.
        """
        state = self._state
        if state is None:
            raise RuntimeError(
                "ctx.state is loaded with the session's first message: use it in handle()"
            )
        self._state_used = True
        return state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"ctx.state must be a dict, got {type(value).__name__}")
        self._state = value
        self._state_used = True

    def _load_state(self, text: str | None) -> None:
        if text is None:
            self._state, self._state_json = {}, "{}"
            return
        value = decode_body(text)
        if not isinstance(value, dict):
            raise ValueError(f"stored state of session {self.session_id!r} is not an object")
        self._state, self._state_json = value, text

    # -- the outbox ---------------------------------------------------------

    def send(self, session_id: str, body: Any) -> _Queued:
        """Send ``body`` to ``session_id`` when, and only if, this message is acked.

        The message is committed in the same transaction as the ack of the
        message being handled (a transactional outbox): if the handler
        fails, nothing is sent, and a redelivered message does not send
        twice. Validated now (as ``System.send`` validates); delivered after
        the commit. Awaiting the result is allowed and optional.

        Raises:
          RuntimeError: called outside ``handle``.
          TypeError / ValueError: as ``System.send``.
        """
        if self._message is None:
            raise RuntimeError(
                "ctx.send() commits with the ack of the message being handled: call it in "
                "handle() (elsewhere, use ctx.system.send())"
            )
        session_id = check_session_id(session_id)
        system = self.system
        data = encode_body(body, system.config.max_message_bytes)
        if self._outbox is None:
            self._outbox = []
        self._outbox.append((session_id, data, system._clock.now()))
        return _QUEUED

    # -- outputs ------------------------------------------------------------

    async def emit(self, value: Any) -> None:
        """Stream ``value`` to the session's subscribers (``System.subscribe``).

        Waits while a subscriber's buffer is full (backpressure); returns at
        once if nobody subscribes. Outputs are live, not durable: a
        redelivered message emits again.
        """
        await self.system._sup.outputs.publish(self.session_id, value)

    # -- the actor's side ---------------------------------------------------

    def _ack(self, msg: Message) -> int | Ack:
        """What the ack of ``msg`` must write: its id alone, or an Ack.

        Raises TypeError if the handler left ``state`` not JSON-compatible,
        ValueError if its text is too large for the database
        (``Store.max_value_bytes``): the attempt fails, and the state is
        rolled back.
        """
        state_json: str | None = None
        if self._state_used:
            try:
                text = encode_json(self._state)
            except (TypeError, ValueError, RecursionError) as exc:
                raise TypeError(f"ctx.state is not JSON-compatible: {exc}") from None
            if text != self._state_json:
                # Checked only when it is written: a text equal to the
                # committed one passed this check when it was written.
                check_encoded(self._state, text, "ctx.state is not JSON-compatible: it")
                limit = self.system._store.max_value_bytes
                if len(text) > limit >> 2:  # (UTF-8 takes at most 4 bytes a character)
                    _check_state_size(text, limit)
                state_json = self._state_json = text
        outbox, self._outbox = self._outbox, None
        if state_json is None and outbox is None and msg.key is None:
            return msg.id
        return Ack(msg.id, self.session_id, state_json, outbox, msg.key, self.system._clock.now())


def _check_state_size(text: str, limit: int) -> None:
    """Refuse a state the database cannot store (the attempt fails, the system goes on)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > limit:
        raise ValueError(
            f"ctx.state is {size} bytes encoded; the database stores at most {limit} "
            "(SQLite's SQLITE_LIMIT_LENGTH, less room for the rest of the row)"
        )


class _Queued:
    """What ``ctx.send`` returns: nothing to wait for, but awaitable."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # pragma: no cover - makes this a generator


_QUEUED = _Queued()


class Actor:
    """Base class of a class-based actor: one instance per active session.

    Subclass it and pass the class as ``run_system(..., handler=MyActor)``.
    An instance is created when the session's actor starts (on demand, after
    a passivation, or after a crash: a crash always gets a fresh instance),
    so attributes set in ``started`` or ``handle`` live exactly as long as
    the actor is active. Durable state belongs in the database.

    ``handle`` is required; ``started`` and ``stopped`` are optional hooks.
    ``stopped`` runs when the actor passivates, yields its slot, stops with
    the system, or after its handler raised; it does not run after a kill
    or a crash of the process, just as no code runs after a real crash.
    """

    async def started(self, ctx: Context) -> None:
        """Called once per instance, before its first message."""

    async def handle(self, ctx: Context, msg: Message) -> None:
        """Process one message. Raise to fail the attempt (it will be retried)."""
        raise NotImplementedError(f"{type(self).__name__} must define handle(self, ctx, msg)")

    async def stopped(self, ctx: Context) -> None:
        """Called when the instance is retired (not after a kill)."""


Handler = Callable[[Context, Message], Awaitable[Any]]


class _FunctionActor(Actor):
    """The function spelling of an actor: ``handler(ctx, msg)`` and nothing else.

    The actor calls ``_fn`` directly, without this class's ``handle`` frame.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Handler) -> None:
        self._fn = fn

    async def handle(self, ctx: Context, msg: Message) -> None:
        await self._fn(ctx, msg)


def actor_factory(handler: object) -> Callable[[], Actor]:
    """Turn ``run_system``'s ``handler`` into a factory of fresh actor instances.

    The handler's signature is checked here, once, so that a handler that
    cannot take ``(ctx, msg)`` is refused at ``run_system`` rather than
    failing every attempt of every message. A callable whose signature
    cannot be inspected (some builtins and C extensions) is taken on trust.

    Raises:
      TypeError: ``handler`` is neither an ``async def handler(ctx, msg)``
        nor a subclass of :class:`Actor` that can be built with no
        arguments and whose ``handle(self, ctx, msg)`` (and
        ``started(self, ctx)``, ``stopped(self, ctx)``, if defined) are
        ``async def`` and take those arguments.
    """
    if isinstance(handler, type):
        if issubclass(handler, Actor):
            if handler.handle is Actor.handle:
                raise TypeError(f"{handler.__name__} must define handle(self, ctx, msg)")
            _check_method(handler, "handle", "ctx, msg")
            _check_method(handler, "started", "ctx")
            _check_method(handler, "stopped", "ctx")
            # The runtime builds each instance as handler(): a class whose
            # __init__ needs an argument would fail every start of every
            # session, before any message is claimed.
            name = handler.__name__
            _check_call(
                handler,
                0,
                f"actor class {name}",
                f"no arguments: the runtime builds each instance as {name}()",
            )
            return handler
        raise TypeError(f"handler class {handler.__name__} must subclass actors.Actor")
    if isinstance(handler, Actor):
        raise TypeError(
            "pass the Actor subclass itself, not an instance: each session gets fresh instances"
        )
    if callable(handler) and (
        inspect.iscoroutinefunction(handler)
        or inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004 - async __call__
    ):
        _check_call(handler, 2, f"handler {_name(handler)}", "(ctx, msg)")
        fn: Handler = handler
        return lambda: _FunctionActor(fn)
    raise TypeError(
        "handler must be an async function handler(ctx, msg) or an actors.Actor subclass, "
        f"got {handler!r}"
    )


def _check_method(cls: type[Actor], name: str, params: str) -> None:
    """Refuse ``cls.<name>`` unless it is ``async def <name>(self, <params>)``."""
    raw = inspect.getattr_static(cls, name)
    if raw is getattr(Actor, name):
        return  # Actor's own hook
    method = getattr(cls, name)
    where = f"{cls.__name__}.{name}"
    if not inspect.iscoroutinefunction(method):
        raise TypeError(f"{where} must be an async method: async def {name}(self, {params})")
    # A plain function is called on an instance: it takes self too.
    count = params.count(",") + 1
    if not isinstance(raw, (staticmethod, classmethod)):
        count += 1
    _check_call(method, count, where, f"(self, {params})")


def _check_call(fn: object, count: int, where: str, expected: str) -> None:
    """Refuse ``fn`` if it cannot be called with ``count`` positional arguments."""
    try:
        signature = inspect.signature(fn)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return  # no signature to inspect (a builtin, a C extension): trust it
    try:
        signature.bind(*range(count))
    except TypeError as exc:
        raise TypeError(
            f"{where} must take {expected}; its signature is {signature} ({exc})"
        ) from None


def _name(fn: object) -> str:
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__name__


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
    TIMEOUT = "timeout"  # (internal to _serve) the handler outlived handler_timeout


@attrs.frozen
class SessionActorStatistics:
    """One session actor right now."""

    session_id: str
    in_flight: int | None  # the id of the message it holds
    handler_running: bool
    idle: bool
    caught_up: bool
    claimed_seq: int
    notified_seq: int
    handed: int  # messages claimed on delivery, queued behind the one in flight
    turn: int  # messages processed in this activation
    parked: bool  # waiting for work (its task parked until someone brings it)


class SessionActor:
    """A session's slot in the registry: its handed messages and its incarnations."""

    def __init__(self, session_id: str, supervisor: Supervisor) -> None:
        self.session_id = session_id
        self._sup = supervisor
        # The claimed message a handler is (about to be) running, until its
        # ack commits. Set and cleared only right after a store call returns,
        # so it always agrees with the database: whatever ends the
        # incarnation, this is the message to fail or release. (A property:
        # the supervisor's busy count follows it.)
        self._in_flight: Message | None = None
        # Whether the handler was started for in_flight (a kill before that
        # gives the attempt back).
        self.handler_started = False
        # The live incarnation's cancel scope (None between incarnations):
        # kill() cancels it, and only it.
        self._scope: trio.CancelScope | None = None
        self._killed = False
        self._failure: BaseException | None = None
        # The failure and its text, when the text was made where it was
        # caught (a failing started() logs it); else _after_crash makes it.
        self._failure_text: tuple[BaseException, FailureText] | None = None
        # The incarnation failed to start (its constructor or started()
        # raised): _after_crash charges that to the session's head message.
        self._start_failed = False
        # ... and found no message to charge it to: the actor may leave.
        self._nothing_to_start = False
        # Cancelled to cut a backoff wait short (stop, a waiter, a wake-up).
        self._wait_scope: trio.CancelScope | None = None
        # The task, while it waits for work (parked: no cancel scope, no
        # channel); unpark() reschedules it. The IdleWatch ends the wait at
        # idle_deadline.
        self._parked: trio.lowlevel.Task | None = None
        self.idle_deadline = math.inf
        self.idle_watched = False
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
        # The actor's task while it waits for its reservation to be settled
        # (_wait_handoff); take_handoff() reschedules it, as unpark() does
        # for the wait for work (cheaper than an Event per reservation).
        self._handoff_waiter: trio.lowlevel.Task | None = None
        # Whether the serve loop runs and may take handoffs (not during a
        # claim from the database, which would find them in flight).
        self._serving = False
        self._claiming = False
        # Serving periods (one per _serve call) and the one a reservation was
        # made in. A handoff is taken only in the period it was reserved in:
        # the store judged "nothing of the session pending" at insert time,
        # and a crash since (the message in flight failed back to pending)
        # may have made that false.
        self._serve_gen = 0
        self._reserve_gen = -1
        # This actor's slot in the start table (see store/starts.py).
        starts = supervisor.store.starts
        self.slot = starts.acquire() if starts is not None else -1
        # handler_timeout (see Watchdog): set around each handler call.
        self.handler_running = False
        self.handler_deadline = math.inf
        self.watched = False  # the watchdog's heap has an entry for this actor
        # Set with the cancel of the incarnation's scope by time_out(): what
        # tells a timeout from a kill (_killed) once the scope has caught it.
        self.timed_out = False
        self.turn = 0  # messages processed since this activation (fair share)
        self.wait_until: float | None = None  # epoch time the head waits for (Exit.WAIT)

    def statistics(self) -> SessionActorStatistics:
        """A snapshot of this actor."""
        return SessionActorStatistics(
            session_id=self.session_id,
            in_flight=self._in_flight.id if self._in_flight is not None else None,
            handler_running=self._in_flight is not None and self.handler_started,
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
            self._sup.busy.add(1 if msg is not None else -1)
        self._in_flight = msg

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
        """Cut an idle or backoff wait short, so the actor looks again."""
        if self._parked is not None:
            self.unpark()
        elif self._wait_scope is not None:
            self._wait_scope.cancel()

    def _abort_park(self, _: object) -> trio.lowlevel.Abort:
        # The parked task is cancelled (a kill, or the system stopping hard).
        self._parked = None
        self._sup.idle_actors.discard(self)
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
            self._sup.idle_actors.discard(self)
            trio.lowlevel.reschedule(task, WOKEN)

    @property
    def idle(self) -> bool:
        """Waiting for work (not running a handler, not between incarnations)."""
        return (self._parked is not None or self._wait_scope is not None) and (
            self.in_flight is None
        )

    def time_out(self) -> None:
        """The running handler passed its deadline (Watchdog): cancel it.

        It cancels the incarnation's scope, as kill() does; ``timed_out``
        tells the two apart (_incarnation).
        """
        if self.handler_running and self._scope is not None and not self._killed:
            self.timed_out = True
            self._scope.cancel()

    def kill(self) -> bool:
        """Crash the live incarnation now. Returns False if none is running."""
        if self._scope is None or self._killed:
            return False
        self._killed = True
        self._scope.cancel()
        return True

    def has_new_work(self) -> bool:
        """True if work came beyond what was claimed: handed, reserved or announced."""
        return bool(self.reserved or self.handed or self.notified_seq > self.claimed_seq)

    # -- the actor's task ---------------------------------------------------

    async def run(self) -> None:
        """Incarnations until the session is idle, waits, yields, or the system stops."""
        sup = self._sup
        task = trio.lowlevel.current_task()
        sup.actor_tasks[task] = self  # (once per activation: see System._calling_actor)
        # One frame, not a wrapper around the loop: every resumption of the
        # actor's task walks its chain of coroutines (a wrapper measured one
        # more call per message in the profile).
        try:
            while True:
                outcome = await self._incarnation()
                if outcome is Exit.CRASH:
                    delay = await self._after_crash()
                    if sup.stopping:
                        await self._release_in_flight()
                        outcome = Exit.STOP
                    elif self._nothing_to_start:
                        outcome = Exit.IDLE  # (it stays if work came: retire() says)
                    elif delay > 0 and (delay > sup.config.idle_timeout or sup.has_waiters):
                        # Leave the slot. The wait must be on the head in the
                        # database, or nothing would bring the session back.
                        if self.wait_until is None:
                            until = sup.clock.now() + delay
                            store = sup.store
                            if await store.defer_head(self.session_id, until):
                                self.wait_until = until
                        outcome = Exit.IDLE if self.wait_until is None else Exit.WAIT
                    else:
                        await self._wait(delay)
                        if not sup.stopping:
                            continue
                        outcome = Exit.STOP  # (woken by the stop: no instance to start for it)
                if sup.retire(self, outcome):
                    return
        except BaseException as exc:
            # Cancelled by a hard stop (or the system failing): the message
            # goes back to the head of its queue for the next start. If its
            # handler started, the attempt stays counted, so the redelivery
            # says attempt > 1. Anything else escaping a handler
            # (KeyboardInterrupt, SystemExit) is treated like a dead process.
            await self._release_in_flight(crashed=not isinstance(exc, trio.Cancelled))
            sup.forget(self)
            raise
        finally:
            del sup.actor_tasks[task]

    async def _incarnation(self) -> Exit:
        sup = self._sup
        ctx = Context(self.session_id, sup.system)
        self._killed = False
        self.timed_out = False
        self._failure = None
        self._failure_text = None
        self._start_failed = False
        self.turn = 0
        self.caught_up = False
        outcome = Exit.CRASH
        instance: Actor | None = None
        # One cancel scope per incarnation, cancelled by kill() and by the
        # Watchdog's time_out() alike: trio's scopes cost enough (a
        # CancelStatus, a context manager, the deadline bookkeeping) that a
        # second one for the handler timeout was a tenth of an activation.
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                instance = sup.factory()
                if type(instance).started is not Actor.started:
                    # started() may read the state: load it now (a function
                    # handler gets it with its first claim instead). The
                    # dict it sees is the state for the whole incarnation:
                    # a reference kept from started() is the state handle()
                    # sees, and what started() changes is committed with the
                    # next message's ack. (If started() used it, every ack
                    # compares it: a kept reference may change it unseen.)
                    store = sup.store
                    ctx._load_state(await store.load_state(self.session_id))
                    await instance.started(ctx)
                else:
                    await instance.started(ctx)
                sup.on_actor_started(self)
                outcome = await self._serve(instance, ctx)
            except StoreError:
                raise
            except BaseException as exc:  # the factory or started() failed: a crash
                failure = failure_of(exc)
                if failure is None:
                    raise
                text = describe(failure)
                self._failure_text = (failure, text)
                log.error(
                    "starting the actor of session %r failed:\n%s", self.session_id, text.report
                )
                self._failure = failure
                self._start_failed = True
                outcome = Exit.CRASH
            else:
                if outcome is not Exit.CRASH and outcome is not Exit.TIMEOUT:
                    await self._stop_instance(instance, ctx)
            finally:
                self._scope = None
                sup.end_isolation(self)
        if scope.cancelled_caught or outcome is Exit.TIMEOUT:
            # Cancelled by kill() or by time_out() (a kill wins); or the
            # handler timed out as it raised or returned (Exit.TIMEOUT).
            outcome = Exit.CRASH
            killed = True
            if self.timed_out and not self._killed:
                assert instance is not None  # (only a running handler times out)
                killed = await self._stop_timed_out(instance, ctx)
            if killed:
                self._failure = ActorKilledError(f"actor of session {self.session_id!r} was killed")
        return outcome

    async def _stop_timed_out(self, instance: Actor, ctx: Context) -> bool:
        """After a handler timeout: record it, and run stopped() in a scope a kill reaches.

        Returns True if a kill cancelled stopped() (the attempt ends killed).
        """
        timeout = self._sup.config.handler_timeout
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

    async def _stop_instance(self, instance: Actor, ctx: Context) -> None:
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

    async def _serve(self, instance: Actor, ctx: Context) -> Exit:
        # The incarnation's cancel scope serves every handler call of it as
        # its timeout: the supervisor's Watchdog cancels it (time_out()) when
        # a running handler passes its deadline, and _incarnation tells that
        # from a kill (a scope per message, or a deadline moved around each
        # call, would cost more than the rest of the message's way through
        # the actor). Returns Exit.TIMEOUT if the handler timed out but the
        # cancellation did not propagate (it raised or returned as it came).
        self._serving = True
        try:
            return await self._serve_loop(instance, ctx)
        finally:
            # No more handoffs: whatever comes next claims from the
            # database (handed messages are given back first).
            self._serving = False
            self._serve_gen += 1
            self.caught_up = False
            self.handler_running = False

    async def _serve_loop(self, instance: Actor, ctx: Context) -> Exit:
        sup = self._sup
        config = sup.config
        store = sup.store
        timeout = config.handler_timeout
        handle = instance._fn if isinstance(instance, _FunctionActor) else instance.handle
        watchdog = sup.watchdog
        starts = store.starts if self.slot >= 0 else None
        now = sup.clock.trio_time  # = trio.current_time, two calls fewer
        acked = sup.on_acks_committed  # (bound once: ack_soon takes it per message)
        ack: int | Ack | None = None
        alone = False  # this actor holds the isolation (see Supervisor.isolate)
        # What one message leaves behind: cleared before every wait for
        # work, so an idle actor keeps nothing of its last message (its
        # body, its handler's result, the claim it came with and the
        # messages that claim took behind it), only the session's state.
        msg: Message | None = None
        claim: Claim | None = None
        result: Any = None
        done: int | Ack | None = None
        while True:
            if sup.stopping:
                await self._flush_ack(ack)
                await self._release_in_flight()
                return Exit.STOP
            if self.turn >= config.fair_share and sup.has_waiters:
                # Its turn is up (counted since this activation, the
                # messages handed to it included): to the back of the line.
                await self._flush_ack(ack)
                await self._release_handed()  # not started: the next activation claims them
                return Exit.YIELD
            if alone and ack is not None:  # the suspect ran: let the others go on
                await self._flush_ack(ack)
                ack = None
                sup.end_isolation(self)
                alone = False
            if sup.isolating is not None and sup.isolating is not self:
                await self._flush_ack(ack)
                ack = None
                # Nothing of ours may be in flight while a suspect runs
                # alone: give handed messages back (reserve() refuses now).
                if self.reserved:
                    await self._wait_handoff()
                await self._release_handed()
                await sup.wait_isolation(self)
                continue
            if self.reserved:
                # Messages are being inserted claimed for this actor: a claim
                # now would find them in flight. Wait until they are handed.
                await self._wait_handoff()
                continue
            if self.handed:
                # Claimed on delivery: committed with the message itself, and
                # nothing of the session in the database comes before it.
                if ack is not None:
                    store.ack_soon(ack, acked)
                    ack = None
                if ctx._state is None:  # handed before this incarnation's first claim
                    self.in_flight = self.handed[0]
                    ctx._load_state(await store.load_state(self.session_id))
                msg = self.handed.popleft()
                if self._in_flight is None:  # (the in_flight setter, inline: per message)
                    sup.busy.add(1)
                self._in_flight = msg
                seq = msg.id
            else:
                announced = self.notified_seq  # committed before this claim runs
                self._claiming = True
                try:
                    claim = await store.claim_next(
                        self.session_id,
                        ack,
                        sup.clock.now(),
                        config.max_attempts,
                        alone,
                        ctx._state is None,
                        self._bulk(alone),
                    )
                finally:
                    self._claiming = False
                # Committed: the ack (if any) and the claim (if any). Record
                # both before the next checkpoint, so a kill sees the truth.
                # (The ack's outbox first: drain() must not see zero between.)
                if claim.sent:
                    sup.on_sent(claim.sent)
                if ack is not None:
                    sup.on_acked()
                    ack = None
                self.in_flight = claim.message
                self.handler_started = False
                if claim.dead:
                    sup.on_dead_lettered(
                        self.session_id, len(claim.dead), claim.dead, "its attempts ran out"
                    )
                if ctx._state is None:
                    ctx._load_state(claim.state)
                msg = claim.message
                if alone and msg is None:  # nothing to run alone after all
                    sup.end_isolation(self)
                    alone = False
                if msg is None:
                    # The claim saw everything announced before it: caught up.
                    self.claimed_seq = max(self.claimed_seq, announced)
                    self.caught_up = claim.wait_until is None and not claim.alone
                    if claim.alone:
                        await sup.isolate(self)
                        alone = True
                        continue
                    if claim.wait_until is not None:
                        delay = sup.clock.to_trio(claim.wait_until) - trio.current_time()
                        if delay > config.idle_timeout or sup.has_waiters:
                            self.wait_until = claim.wait_until
                            return Exit.WAIT
                        await self._wait(delay)
                        continue
                    claim = result = done = None
                    leave = await self._await_work()
                    if leave is not None:
                        return leave
                    continue
                seq = claim.seq
                if claim.extra:
                    # Claimed with it, and before anything handed meanwhile
                    # (a handoff's insert was queued after this claim).
                    self.handed.extendleft(reversed(claim.extra))
                # Nothing queued behind it: once it is handled, everything of
                # the session up to here is, and the router's notices tell
                # of anything later (so handoffs may start).
                self.caught_up = not claim.more
            self.handler_started = False
            if seq > self.claimed_seq:
                self.claimed_seq = seq
            if sup.stopping:
                await self._release_in_flight()
                return Exit.STOP
            await trio.lowlevel.checkpoint_if_cancelled()
            self.handler_started = True
            if starts is not None:
                starts.mark(self.slot, msg.id)  # before the handler: survives a crash
            observer = sup.observer
            if timeout is not None or observer is not None:
                started_at = now()
                self.handler_deadline = started_at + timeout if timeout is not None else math.inf
                if timeout is not None:
                    watchdog.watch(self)
            else:
                started_at = 0.0
                self.handler_deadline = math.inf
            self.handler_running = True
            ctx._message = msg
            try:
                result = await handle(ctx, msg)
                # What the ack writes: the id alone unless the handler touched
                # state or the outbox, or the message has a key (then an Ack;
                # raises if the state cannot be committed).
                done = (
                    ctx._ack(msg)
                    if ctx._state_used or ctx._outbox is not None or msg.key is not None
                    else msg.id
                )
            except BaseException as exc:
                # An Exception fails the attempt, and so does a Cancelled
                # that is not for this task (caught by the handler from an
                # inner scope and raised again outside it): let through, no
                # scope of ours would catch it, and the supervisor's nursery
                # would end quietly. KeyboardInterrupt and the like (and a
                # real cancellation) go on.
                failure = failure_of(exc)
                if failure is None:
                    raise
                self.handler_running = False
                ctx._message = None
                if self.timed_out:
                    return Exit.TIMEOUT  # the watchdog cancelled it as it raised
                self._failure = failure
                await self._stop_instance(instance, ctx)
                return Exit.CRASH
            ctx._message = None
            # (A Cancelled from the watchdog propagates to _serve's scope.)
            self.handler_running = False
            if self.timed_out:
                # The watchdog cancelled it just as it returned: it did
                # outlive handler_timeout, and the scope is spent.
                return Exit.TIMEOUT
            if observer is not None:
                observer(msg, trio.current_time() - started_at)
            if sup.replies and msg.id in sup.replies:
                # An ask waits for this message: it gets the result once the
                # ack has committed (not pipelined), so a reply says the
                # state and the outbox are durable. (The call is shielded:
                # a kill meanwhile lands after the answer.)
                await self._flush_ack(done)
                done = None
                sup.answer(msg.id, result)
            if result is not None and sup.outputs.listening(self.session_id):
                # Backpressure: wait for the slowest subscriber. (A kill here
                # drops the ack: the message runs again, as after any kill.)
                await sup.outputs.publish(self.session_id, result)
            ack = done
            self.turn += 1
            if self.caught_up and self.notified_seq <= self.claimed_seq and not alone:
                # Nothing is known to follow: commit the ack without waiting
                # for it (no claim that would find nothing), and wait for
                # work. The store commits operations in order, so any later
                # claim of this session commits after this ack.
                if ack is not None:
                    if self._in_flight is not None:  # (the in_flight setter, inline)
                        sup.busy.add(-1)
                        self._in_flight = None
                    store.ack_soon(ack, acked)
                    ack = None
                if self.handed and not sup.stopping:
                    # The next message is here already: no wait, and no
                    # checkpoint (the queue is bounded, and the router only
                    # refills it when this task yields).
                    continue
                msg = claim = result = done = None
                leave = await self._await_work()
                if leave is not None:
                    return leave

    def _bulk(self, alone: bool) -> int:
        """How many messages behind the head a claim may take too (see Store.claim_next)."""
        if alone:
            return 0  # a crash suspect runs alone: nothing else of ours in flight
        sup = self._sup
        if sup.has_waiters:  # no more than this turn will run before it yields
            return max(0, min(sup.config.mailbox_size, sup.config.fair_share - self.turn - 1))
        return sup.config.mailbox_size

    async def _flush_ack(self, ack: int | Ack | None) -> None:
        if ack is not None:
            sup = self._sup
            sent = await sup.store.ack(ack)
            self.in_flight = None
            if sent:  # first: drain() must not see zero between
                sup.on_sent(sent)
            sup.on_acked()

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
        sup = self._sup
        if sup.has_waiters:
            return Exit.STOP if sup.stopping else Exit.IDLE
        if self.handed or self.notified_seq > self.claimed_seq:
            await trio.lowlevel.checkpoint()
            return None
        if sup.stopping:  # stop() may have woken us before we got here
            await trio.lowlevel.checkpoint()
            return Exit.STOP
        self.idle_deadline = sup.clock.trio_time() + sup.config.idle_timeout
        sup.idle_watch.watch(self)
        self._parked = trio.lowlevel.current_task()
        sup.idle_actors.add(self)
        await trio.lowlevel.wait_task_rescheduled(self._abort_park)
        if self.handed or self.notified_seq > self.claimed_seq:
            return None
        return Exit.STOP if sup.stopping else Exit.IDLE

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
            self._serving and not self.reserved and len(self.handed) < self._sup.config.mailbox_size
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
        if not self._serving or self._reserve_gen != self._serve_gen:
            return False  # it stopped serving since: they may overtake a failed message
        self.handed.extend(msgs)
        self.claimed_seq = max(self.claimed_seq, msgs[-1].id)
        if self._parked is not None:
            # Rescheduling a parked task is far cheaper than cancelling a
            # wait's scope (an exception, its unwinding, and trio's cancel
            # bookkeeping: a fifth of the loop's time per message, measured).
            self.unpark()
        return True

    async def _release_handed(self) -> None:
        """Give back every handed message (they were never started)."""
        if not self.handed:
            return
        ids = [m.id for m in self.handed]
        self.handed.clear()
        self.caught_up = False
        # If the store failed, the rows stay in flight and are recovered
        # (attempt given back: never started) at the next start.
        with contextlib.suppress(StoreError):
            await self._sup.store.release_many(ids)

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds unless woken (stop, a waiter, an abort)."""
        if delay <= 0 or math.isnan(delay) or self._sup.stopping:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(delay) as scope:
            self._wait_scope = scope
            try:
                await trio.sleep_forever()
            finally:
                self._wait_scope = None

    async def _after_crash(self) -> float:
        """Record the failed attempt; return the seconds before the next incarnation.

        The failure is turned into text here, once and safely (describe():
        a user's exception may misbehave in repr() or str(), or hold text
        the database cannot store), and only that text goes on.
        """
        sup = self._sup
        config = sup.config
        failure = self._failure or ActorKilledError("actor crashed")
        made, self._failure_text = self._failure_text, None
        text = made[1] if made is not None and made[0] is failure else describe(failure)
        msg = self.in_flight
        # A Reject from the handler dead-letters its message now. It is an
        # outcome the handler chose, not a crash: the restart policy does
        # not count it, and the next incarnation starts at once.
        rejection = rejected(failure) if msg is not None and self.handler_started else None
        if rejection is None:
            delay, _suspended = sup.on_restart(self, failure, text.summary)
        else:
            delay = 0.0
            if sup.events.active:  # its instance is done (stopped() ran): say so
                sup.emit("actor_stopped", self.session_id, detail="rejected")
        await self._release_handed()
        self._nothing_to_start = False
        if self._start_failed and msg is None and not sup.stopping:
            msg = await self._charge_failed_start()
            if msg is None:  # nothing due to charge: wait for the head, or leave
                if self.wait_until is None:
                    return delay
                now = sup.clock.now()
                self.wait_until = max(self.wait_until, now + delay)
                return self.wait_until - now
        if msg is not None and not self.handler_started:
            await self._release_in_flight()
            msg = None
        if msg is not None:
            if rejection is None:
                retry_delay = max(delay, config.retry_backoff.delay(msg.attempt, sup.rng))
                max_attempts = config.max_attempts
            else:
                retry_delay, max_attempts = 0.0, 0  # (store.fail: no attempt left)
            retry_at = sup.clock.now() + retry_delay
            outcome = await sup.store.fail(msg.id, text.report, retry_at, max_attempts)
            self.in_flight = None
            sup.on_attempt_failed(self.session_id, msg, failure, outcome == "dead", text)
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
        ``wait_until`` is when its head is, or ``_nothing_to_start`` says
        there is nothing at all).
        """
        sup = self._sup
        store = sup.store
        claim: Claim = await store.claim_next(
            self.session_id,
            None,
            sup.clock.now(),
            sup.config.max_attempts,
            True,
        )
        if claim.dead:
            sup.on_dead_lettered(
                self.session_id, len(claim.dead), claim.dead, "its attempts ran out"
            )
        if claim.seq > self.claimed_seq:  # (as a claim in _serve_loop: notices up to it are seen)
            self.claimed_seq = claim.seq
        if claim.message is None:
            self.wait_until = claim.wait_until
            self._nothing_to_start = claim.wait_until is None
            return None
        self.in_flight = claim.message
        self.handler_started = True  # (the attempt was used: a hard stop keeps it counted)
        return claim.message

    async def _release_in_flight(self, *, crashed: bool = False) -> None:
        """Put the held messages back; an attempt is given back if no handler started."""
        self._serving = False
        await self._release_handed()
        msg = self.in_flight
        if msg is None:
            return
        self.in_flight = None
        uncount = not self.handler_started
        # If the store failed, the row stays in flight and is recovered at the next start.
        with contextlib.suppress(StoreError):
            await self._sup.store.release(msg.id, uncount, crashed and not uncount)
