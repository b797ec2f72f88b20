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

import math
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, overload

import attrs
import trio

from ._config import Config
from ._context import Actor, Context
from ._intercept import A, Handler, Proceed, intercept
from ._intercept import Middleware as Middleware  # (for annotations: actors.testing.Middleware)
from ._policy import Backoff, RestartPolicy
from ._recorder import HandlerEvent, Recorder, RecorderStatistics, Violations
from ._records import Message, SystemStatistics
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
