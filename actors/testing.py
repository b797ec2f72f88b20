"""Chaos testing for your own handlers: kill actors, inject faults, check the promises.

``import actors.testing`` gives you, for tests only:

- :func:`chaos` / :class:`ChaosMonkey`: kill random busy actors at random
  moments, at a given rate, reproducibly per seed;
- :func:`flaky`, :func:`slow`, :func:`hang` (and :func:`intercept` to write
  your own): wrap a handler, function or :class:`~actors.Actor` subclass,
  to make its attempts fail, lag or hang at a given rate;
- :class:`Recorder`: wrap a handler to record every call, then assert that
  nothing was lost, that each session ran in order and one message at a
  time, and that redeliveries said so;
- :func:`quiescent`: wait until the system has nothing left to do;
- :func:`fast_options`: ``run_system`` options under which kills and
  failures are retried after a millisecond instead of seconds of backoff.

A chaos test in three lines::

    recorder = actors.testing.Recorder()
    async with actors.run_system(db, handler=recorder.wrap(handle),
                                 **actors.testing.fast_options()) as system:
        async with actors.testing.chaos(system, seed=1, kills_per_second=100):
            ids = await system.send_many((f"s{i % 10}", i) for i in range(500))
            await system.drain()
        recorder.assert_all(ids, system.dead_letters())

Everything random is seeded, and works on trio's ``MockClock`` as well as
the real clock.
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar, overload

import attrs
import trio

from ._config import Config
from ._context import Actor, Context, actor_factory
from ._policy import Backoff, RestartPolicy
from ._records import DeadLetter, Message, SystemStatistics
from ._system import System
from ._validate import MAX_INT

__all__ = [
    "ChaosMonkey",
    "ChaosStatistics",
    "HandlerEvent",
    "InjectedFailure",
    "Kill",
    "Recorder",
    "RecorderStatistics",
    "Violations",
    "chaos",
    "fast_options",
    "flaky",
    "hang",
    "intercept",
    "quiescent",
    "slow",
]

Handler = Callable[[Context, Message], Awaitable[Any]]
"""An ``async def handler(ctx, msg)``, the function spelling of a handler."""

Proceed = Callable[[], Awaitable[Any]]
Middleware = Callable[[Context, Message, Proceed], Awaitable[Any]]
"""``async def middleware(ctx, msg, proceed)``; ``await proceed()`` runs the handler."""

A = TypeVar("A", bound=Actor)

Outcome = Literal["completed", "failed", "cancelled"]

MAX_LISTED = 10  # violations spelled out in one AssertionError; the rest are counted


# -- validation at the boundary ------------------------------------------------


def _check_seed(seed: object) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed


def _check_rate(name: str, rate: object) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
        raise ValueError(f"{name} must be a probability between 0 and 1, got {rate!r}")
    return float(rate)


def _check_when(when: object) -> None:
    if when not in ("before", "after"):
        raise ValueError(f'when must be "before" or "after", got {when!r}')


# -- run_system options for chaos ----------------------------------------------


def fast_options(**overrides: Any) -> dict[str, Any]:
    """``run_system`` options for tests that kill and fail a lot.

    The defaults of :class:`~actors.Config` are made for production: a
    restarted actor backs off from 0.1 s to 10 s, a session that restarted
    more than 10 times in a minute is suspended, and a message is
    dead-lettered after 4 attempts. Under a chaos monkey that kills many
    times a second, that turns a test into minutes of waiting and a pile of
    dead letters. These options retry a failed message after 1 to 10 ms,
    restart a killed actor after 1 ms and never suspend it, and allow 1000
    attempts per message::

        async with actors.run_system(db, handler=h, **actors.testing.fast_options()):
            ...

    ``overrides`` are more options, or replace these (``max_attempts=3``).

    Raises:
      TypeError: an unknown option; ValueError: a value out of range (as
        :func:`~actors.run_system` would).
    """
    options: dict[str, Any] = {
        "max_attempts": 1000,
        "retry_backoff": Backoff(initial=0.001, maximum=0.01),
        "restart_policy": RestartPolicy(
            max_restarts=1_000_000,
            window=1.0,
            # A millisecond, not zero: a crash loop still pauses in a wait
            # that a shutdown can cut short.
            backoff=Backoff(initial=0.001, maximum=0.001, jitter=0.0),
        ),
    }
    options.update(overrides)
    Config.from_options(options)  # the errors run_system would raise, now
    return options


# -- wrapping handlers -----------------------------------------------------------


@overload
def intercept(handler: type[A], middleware: Middleware) -> type[A]: ...
@overload
def intercept(handler: Handler, middleware: Middleware) -> Handler: ...
def intercept(handler: type[Actor] | Handler, middleware: Middleware) -> type[Actor] | Handler:
    """Wrap ``handler`` so that every call goes through ``middleware``.

    ``middleware`` is ``async def middleware(ctx, msg, proceed)``; it runs in
    the handler's place, under its timeout, and ``await proceed()`` runs the
    wrapped handler once and returns what it returned. The middleware's own
    return value is the handler's outcome (what ``ask`` gets and subscribers
    see): return ``proceed()``'s to pass it on. Raise to fail the attempt;
    don't call ``proceed`` to skip the handler. :func:`flaky`, :func:`slow`, :func:`hang` and
    :meth:`Recorder.wrap` are built on it.

    ``handler`` is either spelling that ``run_system`` takes, and so is the
    result: an ``async def handler(ctx, msg)`` gives an async function; an
    :class:`~actors.Actor` subclass gives a subclass of it whose ``handle``
    goes through ``middleware`` (``started`` and ``stopped`` are untouched,
    and every instance shares the middleware). Wrappers compose:
    ``recorder.wrap(flaky(slow(handle, ...), ...))``.

    Raises:
      TypeError: ``handler`` is not something ``run_system`` accepts (the
        same error ``run_system`` would raise).
    """
    actor_factory(handler)  # validate: run_system's own TypeError, raised now
    if isinstance(handler, type):
        base: type[Actor] = handler

        async def handle(self: Actor, ctx: Context, msg: Message) -> Any:
            return await middleware(ctx, msg, functools.partial(base.handle, self, ctx, msg))

        namespace = {
            "handle": handle,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        return type(base.__name__, (base,), namespace)

    fn: Handler = handler

    async def wrapper(ctx: Context, msg: Message) -> Any:
        return await middleware(ctx, msg, functools.partial(fn, ctx, msg))

    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        if hasattr(fn, attribute):
            setattr(wrapper, attribute, getattr(fn, attribute))
    return wrapper


def _draw(kind: str, seed: int, msg: Message) -> random.Random:
    """The random stream of one wrapper's decision for one attempt of one message.

    Keyed on the message and its attempt, not on call order, so a seed gives
    the same decisions however the sessions interleave.
    """
    return random.Random(f"actors.testing.{kind}:{seed}:{msg.id}:{msg.attempt}")


class InjectedFailure(Exception):
    """The exception :func:`flaky` raises by default: a failure on purpose."""


@overload
def flaky(
    handler: type[A],
    *,
    rate: float,
    seed: int,
    exception: Callable[[str], Exception] = ...,
    when: Literal["before", "after"] = ...,
) -> type[A]: ...
@overload
def flaky(
    handler: Handler,
    *,
    rate: float,
    seed: int,
    exception: Callable[[str], Exception] = ...,
    when: Literal["before", "after"] = ...,
) -> Handler: ...
def flaky(
    handler: type[Actor] | Handler,
    *,
    rate: float,
    seed: int,
    exception: Callable[[str], Exception] = InjectedFailure,
    when: Literal["before", "after"] = "before",
) -> type[Actor] | Handler:
    """Make a fraction ``rate`` of attempts fail with ``exception``.

    With ``when="before"`` a failing attempt raises without running the
    handler. With ``when="after"`` the handler runs to its end, then the
    attempt fails anyway: its side effects are done and the message will be
    delivered again, which is what an idempotent handler must survive.

    ``exception`` is called with a description (message id, attempt) to
    make the exception; an exception class will do. The decision for each
    attempt of each message is drawn from ``seed`` with that message's id
    and attempt number, so a seed fails the same attempts whatever the
    interleaving (and a redelivery gets a fresh draw).

    Raises:
      ValueError: ``rate`` is not between 0 and 1; ``when`` is neither
        ``"before"`` nor ``"after"``.
      TypeError: ``seed`` is not an int; ``handler`` is not a handler.
    """
    rate = _check_rate("rate", rate)
    seed = _check_seed(seed)
    _check_when(when)

    async def middleware(ctx: Context, msg: Message, proceed: Proceed) -> Any:
        fail = _draw("flaky", seed, msg).random() < rate
        what = f"of message {msg.id} (session {msg.session_id!r}, attempt {msg.attempt})"
        if fail and when == "before":
            raise exception(f"flaky: injected failure {what}, before its handler ran")
        result = await proceed()
        if fail:
            raise exception(f"flaky: injected failure {what}, after its handler ran")
        return result

    return intercept(handler, middleware)


@overload
def slow(
    handler: type[A],
    *,
    max_delay: float,
    min_delay: float = ...,
    rate: float = ...,
    seed: int,
) -> type[A]: ...
@overload
def slow(
    handler: Handler,
    *,
    max_delay: float,
    min_delay: float = ...,
    rate: float = ...,
    seed: int,
) -> Handler: ...
def slow(
    handler: type[Actor] | Handler,
    *,
    max_delay: float,
    min_delay: float = 0.0,
    rate: float = 1.0,
    seed: int,
) -> type[Actor] | Handler:
    """Delay a fraction ``rate`` of attempts by ``uniform(min_delay, max_delay)`` seconds.

    The delay (``trio.sleep``, so it follows a ``MockClock``) comes before
    the handler runs and counts against ``handler_timeout``. It gives kills
    something to interrupt: with ``slow`` every attempt is a moment longer
    in flight. Decisions and delays are drawn per message and attempt from
    ``seed``, as in :func:`flaky`.

    Raises:
      ValueError: a delay is negative or not finite, ``min_delay`` is over
        ``max_delay``, or ``rate`` is not between 0 and 1.
      TypeError: ``seed`` is not an int; ``handler`` is not a handler.
    """
    for name, value in (("min_delay", min_delay), ("max_delay", max_delay)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    if min_delay > max_delay:
        raise ValueError(f"min_delay ({min_delay!r}) must not exceed max_delay ({max_delay!r})")
    rate = _check_rate("rate", rate)
    seed = _check_seed(seed)

    async def middleware(ctx: Context, msg: Message, proceed: Proceed) -> Any:
        rng = _draw("slow", seed, msg)
        if rng.random() < rate:
            await trio.sleep(rng.uniform(min_delay, max_delay))
        return await proceed()

    return intercept(handler, middleware)


@overload
def hang(
    handler: type[A], *, rate: float, seed: int, when: Literal["before", "after"] = ...
) -> type[A]: ...
@overload
def hang(
    handler: Handler, *, rate: float, seed: int, when: Literal["before", "after"] = ...
) -> Handler: ...
def hang(
    handler: type[Actor] | Handler,
    *,
    rate: float,
    seed: int,
    when: Literal["before", "after"] = "before",
) -> type[Actor] | Handler:
    """Make a fraction ``rate`` of attempts hang forever.

    A hanging attempt sleeps until it is cancelled: by ``handler_timeout``
    (the attempt fails with :class:`~actors.HandlerTimeoutError`), by a kill,
    or by the system stopping. With ``when="after"`` the handler runs to its
    end first, as a handler that did its work and then got stuck on the way
    out. Set ``handler_timeout`` when you use this, or a hung attempt keeps
    ``drain()`` waiting for the default 300 s. Decisions are drawn per
    message and attempt from ``seed``, as in :func:`flaky`.

    Raises:
      ValueError: ``rate`` is not between 0 and 1; ``when`` is neither
        ``"before"`` nor ``"after"``.
      TypeError: ``seed`` is not an int; ``handler`` is not a handler.
    """
    rate = _check_rate("rate", rate)
    seed = _check_seed(seed)
    _check_when(when)

    async def middleware(ctx: Context, msg: Message, proceed: Proceed) -> Any:
        stuck = _draw("hang", seed, msg).random() < rate
        if stuck and when == "before":
            await trio.sleep_forever()
        result = await proceed()
        if stuck:
            await trio.sleep_forever()
        return result

    return intercept(handler, middleware)


# -- the chaos monkey ------------------------------------------------------------


@attrs.frozen
class Kill:
    """One kill by a :class:`ChaosMonkey`.

    Attributes:
      time: ``trio.current_time()`` when it happened.
      session_id: the session whose actor it killed (or tried to).
      landed: what ``System.kill`` returned: False if the actor was, at
        that moment, between incarnations or already killed.
    """

    time: float
    session_id: str
    landed: bool


@attrs.frozen
class ChaosStatistics:
    """What a :class:`ChaosMonkey` did (``ChaosMonkey.statistics()``).

    Attributes:
      ticks: moments the monkey woke up to kill.
      kills_attempted: ticks that found a target and called ``System.kill``.
      kills_landed: calls that returned True (the actor crashed).
    """

    ticks: int
    kills_attempted: int
    kills_landed: int


class ChaosMonkey:
    """Kills random actors at random moments, reproducibly per seed.

    The monkey wakes up at the moments of a Poisson process of rate
    ``kills_per_second``: the gaps are exponential, drawn with ``trio.sleep``
    from ``random.Random(seed)``. At each moment it picks one session at
    random among ``system.busy_sessions()`` (``target="busy"``: actors with a
    message in flight, so the kill lands mid-message) or
    ``system.active_sessions()`` (``target="active"``: idle actors too) and
    calls ``system.kill()`` on it; with no candidate it does nothing.

    Each moment uses exactly two draws (the gap and the pick), so for a seed
    the moments are always the same, and the victim is the same whenever the
    candidates are; what varies between runs is only what the system is
    doing at those moments.

    The rate is for the whole system: when only one session is still busy
    (the end of a ``drain()``), it takes every kill, and if its attempts
    last longer than ``1 / kills_per_second`` it may be killed until its
    attempts run out. Bound the run with ``max_kills``.

    Run it with :func:`chaos`, or start :meth:`run` in a nursery of your own.
    ``kills`` is the history of every kill attempted, oldest first.

    Raises:
      ValueError: ``kills_per_second`` is not a finite number > 0;
        ``target`` is neither ``"busy"`` nor ``"active"``; ``max_kills`` is
        not None or an int >= 1.
      TypeError: ``seed`` is not an int.
    """

    def __init__(
        self,
        system: System,
        *,
        seed: int,
        kills_per_second: float = 50.0,
        target: Literal["busy", "active"] = "busy",
        max_kills: int | None = None,
    ) -> None:
        if (
            isinstance(kills_per_second, bool)
            or not isinstance(kills_per_second, int | float)
            or not math.isfinite(kills_per_second)
            or kills_per_second <= 0
        ):
            raise ValueError(
                f"kills_per_second must be a finite number > 0, got {kills_per_second!r}"
            )
        if target not in ("busy", "active"):
            raise ValueError(f'target must be "busy" or "active", got {target!r}')
        if max_kills is not None and (
            not isinstance(max_kills, int) or isinstance(max_kills, bool) or max_kills < 1
        ):
            raise ValueError(f"max_kills must be None or an int >= 1, got {max_kills!r}")
        self.system = system
        self.seed = _check_seed(seed)
        self.kills_per_second = float(kills_per_second)
        self.target = target
        self.max_kills = max_kills
        self.kills: list[Kill] = []  # every kill attempted, oldest first
        self._rng = random.Random(seed)
        self._ticks = 0
        self._landed = 0
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Kill until cancelled, or until ``max_kills`` kills have landed.

        Raises:
          RuntimeError: this monkey is already running.
        """
        if self._running:
            raise RuntimeError("this ChaosMonkey is already running")
        self._running = True
        task_status.started()
        try:
            while self.max_kills is None or self._landed < self.max_kills:
                gap = self._rng.expovariate(self.kills_per_second)
                pick = self._rng.random()
                await trio.sleep(gap)
                self._tick(pick)
        finally:
            self._running = False

    def _tick(self, pick: float) -> None:
        self._ticks += 1
        system = self.system
        candidates = system.busy_sessions() if self.target == "busy" else system.active_sessions()
        if not candidates:
            return
        session_id = candidates[int(pick * len(candidates))]
        landed = system.kill(session_id)
        self._landed += landed
        self.kills.append(Kill(trio.current_time(), session_id, landed))

    def statistics(self) -> ChaosStatistics:
        """What the monkey did so far."""
        return ChaosStatistics(
            ticks=self._ticks,
            kills_attempted=len(self.kills),
            kills_landed=self._landed,
        )


@asynccontextmanager
async def chaos(
    system: System,
    *,
    seed: int,
    kills_per_second: float = 50.0,
    target: Literal["busy", "active"] = "busy",
    max_kills: int | None = None,
) -> AsyncIterator[ChaosMonkey]:
    """Run a :class:`ChaosMonkey` on ``system`` for the body of an ``async with``.

    ::

        async with actors.testing.chaos(system, seed=1, kills_per_second=100) as monkey:
            ...  # send, drain: actors die mid-message meanwhile
        print(monkey.statistics())

    The monkey starts before the body runs and is cancelled when it ends
    (or when ``max_kills`` kills have landed). An exception from the body
    leaves the ``async with`` as itself, not wrapped in an exception group.
    Arguments and errors are those of :class:`ChaosMonkey`.
    """
    monkey = ChaosMonkey(
        system, seed=seed, kills_per_second=kills_per_second, target=target, max_kills=max_kills
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(monkey.run)
            try:
                yield monkey
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The monkey itself never fails: a group holds the body's exception.
        if len(group.exceptions) == 1:
            raise group.exceptions[0]  # noqa: B904 - the body's exception keeps its own cause
        raise


# -- waiting for quiescence -----------------------------------------------------


async def quiescent(system: System, *, passivated: bool = False) -> SystemStatistics:
    """Wait until the system has nothing left to do; return its statistics then.

    Quiescent means nothing is pending or in flight (what ``drain()`` waits
    for) and therefore no handler runs, and it still holds when this
    returns: the statistics returned say ``pending == 0`` and
    ``in_flight == 0``, even if other tasks sent more work while it waited.
    With ``passivated=True`` it also waits until every actor has left
    (``active_actors == 0``): their ``stopped()`` hooks have run and no
    restart is under way. That takes ``idle_timeout`` after the last
    message, so use it on a ``MockClock`` or with a small ``idle_timeout``.

    Sends still waiting for their commit are not known to the system yet:
    await them before. Call it inside the ``async with run_system`` block.
    """
    while True:
        await system.drain()
        if passivated:
            await _passivated(system)
        stats = system.statistics()
        if stats.pending == 0 and stats.in_flight == 0 and not (passivated and stats.active_actors):
            return stats


async def _passivated(system: System) -> None:
    """Return once no actor is live (``active_actors == 0``), or the system stopped."""
    if not system.statistics().active_actors:
        await trio.lowlevel.checkpoint()
        return
    # An actor that leaves emits "actor_stopped" in the step that takes it
    # off the count: look again after each event. The buffer is unbounded
    # (the largest allowed), so no event is dropped and none is waited for
    # in vain.
    async with system.events(buffer=MAX_INT) as events:
        async for _ in events:
            if not system.statistics().active_actors:
                return


# -- the recorder ---------------------------------------------------------------


@attrs.frozen
class HandlerEvent:
    """One entry of a :class:`Recorder`'s history: a handler call began or ended.

    Attributes:
      kind: ``"start"`` or ``"end"``.
      session_id, message_id, attempt: the message the call was for
        (``msg.session_id``, ``msg.id``, ``msg.attempt``).
      outcome: for an end, ``"completed"`` (returned normally),
        ``"failed"`` (raised) or ``"cancelled"`` (killed, timed out, or
        stopped with the system); None for a start.
      error: the exception of a failed call, else None.
      time: ``trio.current_time()`` when it happened (None outside trio).
    """

    kind: Literal["start", "end"]
    session_id: str
    message_id: int
    attempt: int
    outcome: Outcome | None = None
    error: BaseException | None = attrs.field(default=None, eq=False)
    time: float | None = None


@attrs.frozen
class RecorderStatistics:
    """Counts of a :class:`Recorder`'s history (``Recorder.statistics()``).

    Attributes:
      started: handler calls that began.
      completed, failed, cancelled: calls that ended each way.
      running: calls that began and have not ended.
      messages: distinct message ids started.
    """

    started: int
    completed: int
    failed: int
    cancelled: int
    running: int
    messages: int


@attrs.frozen
class Violations:
    """What a :class:`Recorder`'s checks found (``Recorder.violations()``).

    Each attribute lists the violations of one check, one sentence each,
    as the ``assert_*`` methods word them; empty when the check passed.

    Attributes:
      lost: acknowledged ids neither completed nor dead (``assert_no_loss``).
      out_of_order: starts out of send order (``assert_fifo``).
      overlapping: a session's calls that overlapped (``assert_one_at_a_time``).
      dishonest: attempt numbers that lied (``assert_honest_attempts``).

    ``str()`` of it is the text ``assert_all`` raises with ("" when ``ok``).
    """

    lost: tuple[str, ...] = ()
    out_of_order: tuple[str, ...] = ()
    overlapping: tuple[str, ...] = ()
    dishonest: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not (self.lost or self.out_of_order or self.overlapping or self.dishonest)

    def __str__(self) -> str:
        checks = (
            ("no loss", self.lost),
            ("FIFO per session", self.out_of_order),
            ("one at a time per session", self.overlapping),
            ("honest attempts", self.dishonest),
        )
        return "\n".join(_describe(name, list(found)) for name, found in checks if found)


class Recorder:
    """Records every call of the handlers it wraps, and checks the runtime's promises.

    ``recorder.wrap(handler)`` returns the handler with every call recorded
    as a start and an end (:class:`HandlerEvent`), in the order they
    happened. Put the recorder outermost (``recorder.wrap(flaky(...))``) so
    that it sees every attempt, injected failures included. After the run,
    the ``assert_*`` methods check the history against the guarantees and
    raise :class:`AssertionError` naming each violation.

    ``record_start`` / ``record_end`` write the history by hand: that is
    what the wrapper calls, and how a test feeds the checks a history of its
    own. ``events`` is the history, oldest first (read it, don't change it).
    :meth:`violations` runs the checks without raising, for a report of
    your own; :meth:`attempts` gives each message's attempts as seen.
    """

    def __init__(self) -> None:
        self.events: list[HandlerEvent] = []
        # {(session_id, message_id, attempt): calls begun and not ended}
        self._open: Counter[tuple[str, int, int]] = Counter()
        self._counts: Counter[str] = Counter()  # "start" and each outcome
        self._changed: trio.Event | None = None  # set at the next event, for wait_until

    # -- writing the history -----------------------------------------------

    @overload
    def wrap(self, handler: type[A]) -> type[A]: ...
    @overload
    def wrap(self, handler: Handler) -> Handler: ...
    def wrap(self, handler: type[Actor] | Handler) -> type[Actor] | Handler:
        """``handler`` (either spelling) with every call recorded; see :func:`intercept`.

        Raises:
          TypeError: ``handler`` is not a handler ``run_system`` accepts.
        """
        return intercept(handler, self._middleware)

    async def _middleware(self, ctx: Context, msg: Message, proceed: Proceed) -> Any:
        self.record_start(msg.session_id, msg.id, msg.attempt)
        try:
            result = await proceed()
        except BaseException as exc:
            if _is_cancellation(exc):
                self.record_end(msg.session_id, msg.id, msg.attempt, "cancelled")
            else:
                self.record_end(msg.session_id, msg.id, msg.attempt, "failed", exc)
            raise
        self.record_end(msg.session_id, msg.id, msg.attempt, "completed")
        return result

    def record_start(self, session_id: str, message_id: int, attempt: int) -> None:
        """Note that a handler call for this message and attempt began."""
        self._open[session_id, message_id, attempt] += 1
        self._append(HandlerEvent("start", session_id, message_id, attempt, time=_now()))

    def record_end(
        self,
        session_id: str,
        message_id: int,
        attempt: int,
        outcome: Outcome,
        error: BaseException | None = None,
    ) -> None:
        """Note that a handler call ended with ``outcome``.

        Raises:
          ValueError: ``outcome`` is not ``"completed"``, ``"failed"`` or
            ``"cancelled"``.
        """
        if outcome not in ("completed", "failed", "cancelled"):
            raise ValueError(
                f'outcome must be "completed", "failed" or "cancelled", got {outcome!r}'
            )
        key = (session_id, message_id, attempt)
        if self._open[key] > 1:
            self._open[key] -= 1
        else:
            self._open.pop(key, None)
        self._append(
            HandlerEvent("end", session_id, message_id, attempt, outcome, error, time=_now())
        )

    def _append(self, event: HandlerEvent) -> None:
        self.events.append(event)
        self._counts[event.outcome or event.kind] += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- reading it ---------------------------------------------------------

    def statistics(self) -> RecorderStatistics:
        """Counts of the history so far."""
        counts = self._counts
        return RecorderStatistics(
            started=counts["start"],
            completed=counts["completed"],
            failed=counts["failed"],
            cancelled=counts["cancelled"],
            running=sum(self._open.values()),
            messages=len({e.message_id for e in self.events if e.kind == "start"}),
        )

    def running(self) -> dict[str, int]:
        """``{session_id: message id}`` of the handler calls running now."""
        return {session: message for (session, message, _), n in self._open.items() if n}

    def completed_ids(self) -> set[int]:
        """Ids of the messages a handler call completed (returned normally) for."""
        return {e.message_id for e in self.events if e.outcome == "completed"}

    def attempts(self) -> dict[int, list[int]]:
        """``{message id: the attempt of each of its calls}``, in the order the calls began."""
        seen: defaultdict[int, list[int]] = defaultdict(list)
        for event in self.events:
            if event.kind == "start":
                seen[event.message_id].append(event.attempt)
        return dict(seen)

    async def wait_until(self, predicate: Callable[[Recorder], bool]) -> None:
        """Return once ``predicate(recorder)`` is true, checking after every event.

        For example ``await recorder.wait_until(lambda r: r.running())``
        waits until some handler runs: a way to aim a kill without a sleep.
        """
        await trio.lowlevel.checkpoint()
        while not predicate(self):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    # -- checking it --------------------------------------------------------

    def assert_no_loss(
        self, sent_ids: Iterable[int], dead: Iterable[int | DeadLetter] = ()
    ) -> None:
        """Every id in ``sent_ids`` was completed by a handler call, or is dead.

        ``dead`` is the dead letters (``system.dead_letters()``) or their
        ids. Invariant 1: once ``send()`` returned an id, its message is
        processed or dead-lettered.

        Raises:
          AssertionError: naming each lost id and what the recorder saw of it.
        """
        _raise("no loss", self._lost(sent_ids, dead))

    def assert_fifo(self, dead: Iterable[int | DeadLetter] | None = None) -> None:
        """Each session's messages started in send order.

        A session's handler calls may repeat the current message (a
        redelivery) but never go back to an older one (ids grow in send
        order). With ``dead`` given, also: a session moved on from a message
        only after a call for it completed or it was dead-lettered, since a
        retry holds back the messages behind it. (This assumes plain sends:
        a delayed message or one requeued by ``retry_dead()`` enters its
        queue later than its id says, and an ``abort()`` lets a session
        move on.)

        Raises:
          AssertionError: naming each message that started out of order.
        """
        dead_ids = None if dead is None else _ids(dead)
        _raise("FIFO per session", self._out_of_order(dead_ids))

    def assert_one_at_a_time(self) -> None:
        """No session ever had two handler calls running at once.

        Raises:
          AssertionError: naming each call that started while another call
            of its session ran (or that ended without having started).
        """
        _raise("one at a time per session", self._overlapping())

    def assert_honest_attempts(self, *, seen_all: bool = True) -> None:
        """Redeliveries said so: each message's calls say attempt 1, 2, 3, ...

        A message's first call says ``attempt == 1`` and each redelivery one
        more than the call before, and a message runs again only after a
        call for it failed or was cancelled (a completed message is not
        delivered again). Pass ``seen_all=False`` if the recorder cannot
        have seen every attempt (the system recovered messages a dead
        process left in flight, or a wrapper outside the recorder failed
        some calls): then attempts must only grow.

        Raises:
          AssertionError: naming each message whose attempts were dishonest.
        """
        _raise("honest attempts", self._dishonest(seen_all))

    def assert_all(self, sent_ids: Iterable[int], dead: Iterable[int | DeadLetter] = ()) -> None:
        """All four checks at once: no loss, FIFO (with ``dead``), one at a time, honest attempts.

        Raises:
          AssertionError: listing the violations of every check that failed.
        """
        found = self.violations(sent_ids, dead)
        if not found.ok:
            raise AssertionError(str(found))

    def violations(
        self,
        sent_ids: Iterable[int] | None = None,
        dead: Iterable[int | DeadLetter] | None = None,
        *,
        seen_all: bool = True,
    ) -> Violations:
        """Run the four checks and return what they found, without raising.

        The checks and their arguments are those of the ``assert_*``
        methods: ``lost`` is checked only with ``sent_ids``; FIFO holds
        messages back behind a retry only with ``dead`` (as
        :meth:`assert_fifo`); ``seen_all`` is :meth:`assert_honest_attempts`'s.
        """
        dead_ids = None if dead is None else _ids(dead)
        return Violations(
            lost=() if sent_ids is None else tuple(self._lost(sent_ids, dead_ids or set())),
            out_of_order=tuple(self._out_of_order(dead_ids)),
            overlapping=tuple(self._overlapping()),
            dishonest=tuple(self._dishonest(seen_all)),
        )

    # -- the checks, as lists of violations -----------------------------------

    def _lost(self, sent_ids: Iterable[int], dead: Iterable[int | DeadLetter]) -> list[str]:
        sent = list(sent_ids)
        dead_ids = _ids(dead)
        completed = self.completed_ids()
        lost = [i for i in sent if i not in completed and i not in dead_ids]
        if not lost:
            return []
        calls: defaultdict[int, list[HandlerEvent]] = defaultdict(list)
        wanted = set(lost)
        for event in self.events:
            if event.message_id in wanted:
                calls[event.message_id].append(event)
        found = []
        for message_id in lost:
            seen = calls[message_id]
            starts = [e for e in seen if e.kind == "start"]
            if not starts:
                found.append(
                    f"message {message_id} was acknowledged and is not dead, but never started"
                )
                continue
            ends = [e for e in seen if e.kind == "end"]
            last = (
                f"its last call (attempt {ends[-1].attempt}) {ends[-1].outcome}"
                if ends
                else "no call of it ended"
            )
            found.append(
                f"message {message_id} (session {starts[0].session_id!r}) was acknowledged "
                f"and is not dead, but never completed: started {len(starts)} time(s), {last}"
            )
        return found

    def _out_of_order(self, dead_ids: set[int] | None) -> list[str]:
        found = []
        # {session: [current message id, whether its last call completed]}
        current: dict[str, list[Any]] = {}
        for event in self.events:
            state = current.get(event.session_id)
            if event.kind == "end":
                if state is not None and state[0] == event.message_id:
                    state[1] = event.outcome == "completed"
                continue
            if state is None:
                current[event.session_id] = [event.message_id, False]
            elif event.message_id < state[0]:
                found.append(
                    f"session {event.session_id!r}: message {event.message_id} "
                    f"(attempt {event.attempt}) started after message {state[0]}, "
                    "which was sent after it"
                )
            elif event.message_id > state[0]:
                if dead_ids is not None and not state[1] and state[0] not in dead_ids:
                    found.append(
                        f"session {event.session_id!r}: message {event.message_id} started "
                        f"while message {state[0]}, sent before it, had neither completed "
                        "nor been dead-lettered (a retry must hold back the messages behind it)"
                    )
                current[event.session_id] = [event.message_id, False]
        return found

    def _overlapping(self) -> list[str]:
        found = []
        running: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)
        for event in self.events:
            calls = running[event.session_id]
            call = (event.message_id, event.attempt)
            if event.kind == "start":
                if calls:
                    other, other_attempt = calls[-1]
                    found.append(
                        f"session {event.session_id!r}: message {event.message_id} "
                        f"(attempt {event.attempt}) started while message {other} "
                        f"(attempt {other_attempt}) was still running"
                    )
                calls.append(call)
            elif call in calls:
                calls.remove(call)
            else:
                found.append(
                    f"session {event.session_id!r}: a call for message {event.message_id} "
                    f"(attempt {event.attempt}) ended without having started"
                )
        return found

    def _dishonest(self, seen_all: bool) -> list[str]:
        found = []
        attempts: defaultdict[int, list[int]] = defaultdict(list)
        last_outcome: dict[int, Outcome | None] = {}
        for event in self.events:
            message_id = event.message_id
            if event.kind == "end":
                last_outcome[message_id] = event.outcome
                continue
            seen = attempts[message_id]
            attempt = event.attempt
            if not seen:
                if attempt < 1 or (seen_all and attempt != 1):
                    found.append(
                        f"message {message_id}: its first delivery said attempt {attempt}, not 1"
                    )
            elif attempt <= seen[-1]:
                found.append(
                    f"message {message_id}: delivered again with attempt {attempt} after "
                    f"attempt {seen[-1]}; a redelivery must say a higher attempt"
                )
            elif seen_all and attempt != seen[-1] + 1:
                found.append(
                    f"message {message_id}: attempt {attempt} came after attempt {seen[-1]}; "
                    f"attempt {seen[-1] + 1} was never seen"
                )
            if seen and seen_all and last_outcome.get(message_id) == "completed":
                found.append(
                    f"message {message_id}: delivered again (attempt {attempt}) after "
                    f"attempt {seen[-1]} completed; a duplicate needs a failure, a kill or "
                    "a crash in between"
                )
            seen.append(attempt)
        return found


def _ids(dead: Iterable[int | DeadLetter]) -> set[int]:
    return {d.id if isinstance(d, DeadLetter) else d for d in dead}


def _now() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run: a history written by hand
        return None


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return False


def _describe(check: str, found: list[str]) -> str:
    shown = found[:MAX_LISTED]
    lines = [f"{check}: {len(found)} violation(s)"]
    lines += [f"  - {line}" for line in shown]
    if len(found) > len(shown):
        lines.append(f"  ... and {len(found) - len(shown)} more")
    return "\n".join(lines)


def _raise(check: str, found: list[str]) -> None:
    if found:
        raise AssertionError(_describe(check, found))
