"""The user's side of an actor: :class:`Context`, :class:`Actor`, and the handler check.

A handler sees a :class:`Context` (its session, durable state, outbox and
the running system) and, for a class-based actor, is an :class:`Actor`
subclass. ``run_system`` turns its ``handler`` argument into a
:class:`~actors._actor.Behaviour` here, once, refusing one that could not be
called as the runtime calls it. The session actor (``_actor.py``) runs
what this module describes without importing it: it sees a context only as
the :class:`~actors._session.SessionData` behind it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from ._clock import wall_time
from ._codec import check_session_id, encode_body
from ._host import Behaviour
from ._records import Message
from ._session import SessionData
from ._streams import Outputs
from ._validate import MAX_OPTION_INT

# The largest state a hand-made context would let a handler keep (it never commits).
_UNBOUNDED = 2**62

if TYPE_CHECKING:
    from ._system import System


class Context:
    """What a handler gets besides the message: its session, state and outbox.

    Attributes:
      session_id: the session this actor serves.
      system: the running :class:`System` (``ctx.system.send`` sends at
        once, outside the message's transaction; ``ctx.send`` is usually
        what you want).

    A context belongs to one incarnation of the session's actor: a restart
    gets a fresh one, loaded from what was committed. The runtime makes
    them (its third argument, ``data``, is the runtime's); one made by hand,
    ``Context(session_id, system)``, has no state loaded yet, and what it
    emits reaches no subscriber.
    """

    __slots__ = ("_data", "session_id", "system")

    def __init__(self, session_id: str, system: System, data: SessionData | None = None) -> None:
        self.session_id = session_id
        self.system = system
        # The runtime passes the incarnation's SessionData. A context made
        # by hand (a unit test of a handler) gets one of its own: its state
        # is not loaded, and what it emits reaches no subscriber.
        if data is None:
            data = SessionData(session_id, wall_time, Outputs(), _UNBOUNDED)
        self._data = data

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
        data = self._data
        state = data.state
        if state is None:
            raise RuntimeError(
                "ctx.state is loaded with the session's first message: use it in handle()"
            )
        data.state_used = True
        return state

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise TypeError(f"ctx.state must be a dict, got {type(value).__name__}")
        self._data.state = value
        self._data.state_used = True

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
        if self._data.message is None:
            raise RuntimeError(
                "ctx.send() commits with the ack of the message being handled: call it in "
                "handle() (elsewhere, use ctx.system.send())"
            )
        session_id = check_session_id(session_id)
        self._data.queue(session_id, encode_body(body, self.system.config.max_message_bytes))
        return _QUEUED

    # -- outputs ------------------------------------------------------------

    async def emit(self, value: Any) -> None:
        """Stream ``value`` to the session's subscribers (``System.subscribe``).

        Waits while a subscriber's buffer is full (backpressure); returns at
        once if nobody subscribes. Outputs are live, not durable: a
        redelivered message emits again.
        """
        await self._data.publish(value)


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

    async def handle_batch(self, ctx: Context, msgs: list[Message]) -> Any:
        """Process a batch: consecutive pending messages of the session, in order.

        Used instead of ``handle`` when a subclass defines it; its largest
        batch is 100 messages, or what ``@actors.batched(max_size=...)`` on
        the method says. Returns None, or a list of one value per message
        (what ``ask()`` of that message gets). See ``actors.batched``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define handle_batch(self, ctx, msgs)"
        )

    async def stopped(self, ctx: Context) -> None:
        """Called when the instance is retired (not after a kill)."""


Handler = Callable[[Context, Message], Awaitable[Any]]

F = TypeVar("F", bound=Callable[..., Any])

# The attribute batched() sets on the function it marks: its max_size.
_MAX_BATCH = "__actors_max_batch__"
DEFAULT_MAX_BATCH = 100


@overload
def batched(fn: F, /) -> F: ...
@overload
def batched(*, max_size: int = DEFAULT_MAX_BATCH) -> Callable[[F], F]: ...
def batched(fn: Any = None, /, *, max_size: int = DEFAULT_MAX_BATCH) -> Any:
    """Make a handler take a session's pending messages at once.

    ``@actors.batched(max_size=100)`` on ``async def handle(ctx, msgs)``
    (or on an :class:`Actor`'s ``handle_batch`` method, to set its size):
    the handler gets a list of consecutive messages of one session, in
    order, at most ``max_size``, made of what is already claimed for the
    session (it never waits for more: a lone message comes as a batch of
    one). One acknowledgement commits the whole batch with its
    ``ctx.state`` and ``ctx.send`` changes. The handler returns None, or a
    list of one value per message (what ``ask()`` of that message gets).
    A batch that fails has each of its messages retried alone (see
    docs/howto-batches.md). ``@actors.batched`` alone means
    ``max_size=100``. Returns the function itself, marked (a bound method
    or another callable that takes no attributes: a function calling it).

    Raises:
      TypeError: ``max_size`` is not an int, or what it decorates is not an
        async function.
      ValueError: ``max_size`` is less than 1.
    """
    if fn is not None:
        return batched(max_size=max_size)(fn)
    max_size = check_max_batch(max_size)

    def mark(handler: F) -> F:
        if not _is_async(handler):
            raise TypeError(
                "actors.batched marks an async function: async def handle(ctx, msgs), "
                f"got {handler!r}"
            )
        try:
            setattr(handler, _MAX_BATCH, max_size)
        except (AttributeError, TypeError):
            # A bound method (or another callable without attributes of
            # its own): marked through a function that calls it.
            inner: Callable[[Any, Any], Awaitable[Any]] = handler

            @functools.wraps(inner)
            async def call(ctx: Any, msgs: Any) -> Any:
                return await inner(ctx, msgs)

            setattr(call, _MAX_BATCH, max_size)
            return cast(F, call)
        return handler

    return mark


def check_max_batch(value: object) -> int:
    """``value`` as a batch's largest size; raises TypeError or ValueError."""
    if type(value) is not int:  # (a bool is refused too)
        raise TypeError(f"max_size must be an int, got {type(value).__name__}")
    if not 1 <= value <= MAX_OPTION_INT:
        raise ValueError(f"max_size must be at least 1 (and at most {MAX_OPTION_INT}), got {value}")
    return value


def _is_async(handler: object) -> bool:
    return callable(handler) and (
        inspect.iscoroutinefunction(handler)
        or inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004 - async __call__
    )


class _FunctionActor(Actor):
    """The function spelling of an actor: ``handler(ctx, msg)`` and nothing else.

    The session actor calls the function directly (``Behaviour.function``),
    without this class's ``handle`` frame.
    """

    __slots__ = ("_fn",)

    def __init__(self, fn: Handler) -> None:
        self._fn = fn

    async def handle(self, ctx: Context, msg: Message) -> None:
        await self._fn(ctx, msg)


def actor_factory(handler: object) -> Behaviour:
    """Turn ``run_system``'s ``handler`` into what the session actors run: fresh instances.

    The handler's signature is checked here, once, so that a handler that
    cannot take ``(ctx, msg)`` is refused at ``run_system`` rather than
    failing every attempt of every message. A callable whose signature
    cannot be inspected (some builtins and C extensions) is taken on trust.

    Raises:
      TypeError: ``handler`` is neither an ``async def handler(ctx, msg)``
        (``handler(ctx, msgs)`` if marked :func:`batched`) nor a subclass
        of :class:`Actor` that can be built with no arguments and whose
        ``handle(self, ctx, msg)`` or ``handle_batch(self, ctx, msgs)``
        (and ``started(self, ctx)``, ``stopped(self, ctx)``, if defined)
        are ``async def`` and take those arguments.
    """
    if isinstance(handler, type):
        if issubclass(handler, Actor):
            max_batch = _actor_batch(handler)
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
            # started() may read the state: a class with its own started()
            # gets the state loaded before it (a function handler gets it
            # with its first claim instead).
            return Behaviour(
                handler,
                handler.started is not Actor.started,
                None,
                max_batch,
                handler.stopped is Actor.stopped,
            )
        raise TypeError(f"handler class {handler.__name__} must subclass actors.Actor")
    if isinstance(handler, Actor):
        raise TypeError(
            "pass the Actor subclass itself, not an instance: each session gets fresh instances"
        )
    if _is_async(handler):
        max_batch = getattr(handler, _MAX_BATCH, 0)
        if max_batch:
            _check_call(handler, 2, f"batched handler {_name(handler)}", "(ctx, msgs)")
        else:
            _check_call(handler, 2, f"handler {_name(handler)}", "(ctx, msg)")
        fn: Handler = handler  # type: ignore[assignment]
        # One instance for every session: it holds nothing but the function.
        shared = _FunctionActor(fn)
        return Behaviour(lambda: shared, False, fn, max_batch, True)
    raise TypeError(
        "handler must be an async function handler(ctx, msg) or an actors.Actor subclass, "
        f"got {handler!r}"
    )


def _actor_batch(cls: type[Actor]) -> int:
    """Check ``cls``'s ``handle`` or ``handle_batch``; the largest batch (0: not batched)."""
    name = cls.__name__
    if cls.handle_batch is not Actor.handle_batch:
        _check_method(cls, "handle_batch", "ctx, msgs")
        return int(getattr(cls.handle_batch, _MAX_BATCH, DEFAULT_MAX_BATCH))
    if getattr(cls.handle, _MAX_BATCH, 0):
        raise TypeError(
            f"{name}.handle is marked actors.batched: name the method handle_batch(self, ctx, msgs)"
        )
    if cls.handle is Actor.handle:
        raise TypeError(
            f"{name} must define handle(self, ctx, msg) (or handle_batch(self, ctx, msgs))"
        )
    _check_method(cls, "handle", "ctx, msg")
    return 0


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
