"""The timer: delayed messages and retry waits, on deadlines, never polling.

One task sleeps until the earliest deadline stored in the database (an index
on ``not_before`` makes that one lookup), so a million delayed messages cost
disk, not timers in RAM. When a deadline passes it moves delayed messages
into their sessions' queues and wakes the sessions whose retry wait ended.

Deadlines are epoch times, compared with the run's Clock (trio's monotonic
clock from the wall time at start): a jump of the system clock during a run
changes no wait. Across a restart a clock that went back is bounded at open
(sqlite_schema.bound_waits); one that went forward ends waits early.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import attrs
import trio

from ._clock import Clock
from .store import Store

log = logging.getLogger("actors.timer")

PROMOTE_BATCH = 1000


@attrs.frozen
class TimerStatistics:
    """What the timer did since start, and when it wakes next."""

    fired: int  # delayed messages promoted plus sessions woken after a retry wait
    next_deadline: float  # trio time of the next wake-up (inf: none)


class Timer:
    """Wakes sessions when delays and retry waits end.

    ``wake(session_id, seq)`` is told of each session whose work is due:
    ``seq`` is the highest delayed message that entered its queue, 0 for a
    session whose retry wait ended (the supervisor's ``ensure``, which owns
    the timer: the timer knows nothing of actors).
    """

    def __init__(self, store: Store, clock: Clock, wake: Callable[[str, int], None]) -> None:
        self._store = store
        self._clock = clock
        self._wake = wake
        # Waits are written with the run's clock, and so is their writing time
        # (see Store.use_clock), not with a wall clock read anew.
        store.use_clock(clock.now)
        # Retry deadlines at or before _horizon have been handled (epoch s).
        self._horizon = 0.0
        # The sleep in progress; schedule() pulls its deadline earlier.
        self._sleep: trio.CancelScope | None = None
        # Earliest deadline scheduled while a lookup was under way.
        self._scheduled = math.inf
        self.fired = 0

    def statistics(self) -> TimerStatistics:
        """Counters since start, and the next wake-up."""
        deadline = self._sleep.deadline if self._sleep is not None else math.inf
        return TimerStatistics(fired=self.fired, next_deadline=deadline)

    def schedule(self, wall: float, session_id: str | None = None) -> None:
        """A deadline at epoch time ``wall`` was committed; wake up for it.

        A retry wait that has already ended wakes ``session_id`` at once.
        """
        if session_id is not None and wall <= self._clock.now():
            self._wake(session_id, 0)
            return
        self._scheduled = min(self._scheduled, wall)
        if self._sleep is not None:
            self._sleep.deadline = min(self._sleep.deadline, self._clock.to_trio(wall))

    async def run(self) -> None:
        """Sleep to the next deadline, handle what is due, repeat."""
        store = self._store
        wake = self._wake
        while True:
            self._scheduled = math.inf
            nxt = await store.next_due(self._horizon)
            target = min(nxt if nxt is not None else math.inf, self._scheduled)
            deadline = self._clock.to_trio(target) if math.isfinite(target) else math.inf
            with trio.CancelScope(deadline=deadline) as sleep:
                self._sleep = sleep
                try:
                    await trio.sleep_forever()
                finally:
                    self._sleep = None
            now = self._clock.now()
            while True:
                due = await store.collect_due(self._horizon, now, PROMOTE_BATCH)
                promoted, sessions, more = due.promoted, due.retry_sessions, due.more
                self.fired += len(promoted) + len(sessions)
                if promoted or sessions:
                    log.debug(
                        "%d delayed message(s) due, %d session(s) done waiting for a retry",
                        len(promoted),
                        len(sessions),
                    )
                for session_id, seq in promoted:
                    wake(session_id, seq)
                for session_id in sessions:
                    wake(session_id, 0)
                if not more:
                    break
            self._horizon = now
