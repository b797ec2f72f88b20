"""Retry backoff and the restart policy: pure functions of counts and time."""

from __future__ import annotations

import math
import random
from collections import deque

import attrs


def _non_negative(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _at_least_one(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 1):
        raise ValueError(f"{attribute.name} must be a finite number >= 1, got {value!r}")


def _fraction(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and 0 <= value <= 1):
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


@attrs.frozen
class Backoff:
    """Exponential backoff, capped, with jitter.

    The n-th delay (n >= 1) is ``min(maximum, initial * multiplier ** (n - 1))``,
    then scaled by a random factor in ``[1 - jitter, 1]`` so that sessions
    that failed together do not retry together.
    """

    initial: float = attrs.field(default=1.0, validator=_non_negative)
    multiplier: float = attrs.field(default=2.0, validator=_at_least_one)
    maximum: float = attrs.field(default=60.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.2, validator=_fraction)

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        """The delay before the ``n``-th retry (``n`` >= 1), in seconds."""
        if n < 1:
            return 0.0
        exponent = min(n - 1, 64)  # beyond 2**64 every delay is capped anyway
        base = min(self.maximum, self.initial * self.multiplier**exponent)
        if self.jitter:
            base *= 1.0 - self.jitter * (rng or random).random()
        return base


@attrs.frozen
class RestartPolicy:
    """How the supervisor restarts a session's crashed actor.

    A crash is a handler exception, a handler timeout or a kill. The n-th
    restart within ``window`` seconds waits ``backoff.delay(n)``; restarts
    older than ``window`` are forgotten, so a session that crashed once an
    hour ago restarts at once. More than ``max_restarts`` within ``window``
    suspends the session until the window has room again: its work stays in
    the database and other sessions keep going.
    """

    max_restarts: int = attrs.field(default=10)
    window: float = attrs.field(default=60.0, validator=_non_negative)
    backoff: Backoff = attrs.field(factory=lambda: Backoff(initial=0.1, maximum=10.0))

    @max_restarts.validator
    def _check_max_restarts(self, attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"max_restarts must be an int >= 1, got {value!r}")


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
