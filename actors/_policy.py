"""Retry backoff and the restart policy: pure functions of counts and time."""

from __future__ import annotations

import random
from collections import deque

import attrs

from . import _validate as v


@attrs.frozen
class Backoff:
    """Exponential backoff, capped, with jitter.

    The n-th delay (n >= 1) is ``min(maximum, initial * multiplier ** (n - 1))``,
    then scaled by a random factor in ``[1 - jitter, 1]`` so that sessions
    that failed together do not retry together.

    ``initial`` and ``maximum`` are seconds (finite, >= 0, at most 10**9),
    ``multiplier`` a finite number >= 1, ``jitter`` a number from 0 to 1:
    ``TypeError`` for a wrong type (a bool, a str), ``ValueError`` out of
    range.
    """

    initial: float = attrs.field(default=1.0, validator=v.field(v.check_seconds))
    multiplier: float = attrs.field(default=2.0, validator=v.field(v.check_number, minimum=1))
    maximum: float = attrs.field(default=60.0, validator=v.field(v.check_seconds))
    jitter: float = attrs.field(
        default=0.2, validator=v.field(v.check_number, minimum=0, maximum=1)
    )

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        """The delay before the ``n``-th retry (``n`` >= 1), in seconds; 0 for ``n`` < 1.

        Total: for any ``n``, finite and at most ``maximum`` (a growth past
        the range of a float is past the cap), so a session that failed a
        million times waits ``maximum``, never an OverflowError.

        Raises:
          TypeError: ``n`` is not an int, or ``rng`` is neither a
            ``random.Random`` nor None.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        v.check_instance("rng", rng, random.Random, optional=True)
        if n < 1:
            return 0.0
        base = self._undithered(n)
        if self.jitter:
            base *= 1.0 - self.jitter * (rng or random).random()
        return base

    def _undithered(self, n: int) -> float:
        initial, maximum = self.initial, self.maximum
        if initial == 0 or self.multiplier == 1 or initial >= maximum:
            return float(min(initial, maximum))
        try:
            # float ** int: no exponent cap (a slow multiplier still reaches
            # the maximum), and no bigint when the multiplier is an int.
            grown = initial * float(self.multiplier) ** (n - 1)
        except OverflowError:  # past the largest float, so past the cap
            return float(maximum)
        return float(min(grown, maximum))  # grown may be inf: min takes the cap


@attrs.frozen
class RestartPolicy:
    """How the supervisor restarts a session's crashed actor.

    A crash is a handler exception, a handler timeout or a kill. The n-th
    restart within ``window`` seconds waits ``backoff.delay(n)``; restarts
    older than ``window`` are forgotten, so a session that crashed once an
    hour ago restarts at once. More than ``max_restarts`` within ``window``
    suspends the session until the window has room again: its work stays in
    the database and other sessions keep going.

    ``max_restarts`` is an int from 1 to 2**31 - 1, ``window`` seconds
    (finite, >= 0, at most 10**9), ``backoff`` a Backoff: ``TypeError`` for
    a wrong type, ``ValueError`` out of range.
    """

    max_restarts: int = attrs.field(default=10, validator=v.field(v.check_option_int))
    window: float = attrs.field(default=60.0, validator=v.field(v.check_seconds))
    backoff: Backoff = attrs.field(
        factory=lambda: Backoff(initial=0.1, maximum=10.0), validator=v.instance_of(Backoff)
    )


class RestartTracker:
    """Restart history per session, for sessions that restarted recently.

    Memory grows with sessions that crashed within the last ``window``
    seconds, not with all sessions: entries older than the window are
    pruned on every call.
    """

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self._policy = policy
        self._rng = rng
        # {session_id: restart times (trio clock) within the window, oldest first}
        self._history: dict[str, deque[float]] = {}

    def record(self, session_id: str, now: float) -> tuple[float, bool]:
        """Note a restart of ``session_id`` at ``now``.

        Returns ``(delay, suspended)``: how long to wait before the restart,
        and whether that wait is a suspension (too many restarts in the window).
        """
        horizon = now - self._policy.window
        history = self._history.setdefault(session_id, deque())
        while history and history[0] <= horizon:
            history.popleft()
        history.append(now)
        self._prune(horizon)
        count = len(history)
        if count > self._policy.max_restarts:
            # Wait until the oldest restart leaves the window.
            return max(history[0] + self._policy.window - now, 0.0), True
        return self._policy.backoff.delay(count, self._rng), False

    def _prune(self, horizon: float) -> None:
        if len(self._history) < 1024:
            return
        stale = [s for s, h in self._history.items() if not h or h[-1] <= horizon]
        for s in stale:
            del self._history[s]

    def recent(self, session_id: str, now: float) -> int:
        """How many restarts of ``session_id`` fall within the window."""
        history = self._history.get(session_id)
        if not history:
            return 0
        return sum(1 for t in history if t > now - self._policy.window)
