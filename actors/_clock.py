"""Wall-clock times that move with trio's clock.

Stored times (``enqueued_at``, retry and delay deadlines) are seconds since
the epoch so they mean the same after a restart. Inside a run they are
derived from ``trio.current_time()``, so they are monotonic while the
process lives and follow ``trio.testing.MockClock`` in tests.

The wall clock is read once per run, when the run starts (``wall_time``):
a jump of the system's clock while a system runs moves none of its
deadlines. Across a restart, a clock that went back is caught by the store
(``sqlite_schema.bound_waits``): no wait lasts longer than it was when written.
"""

from __future__ import annotations

import time

import trio


def wall_time() -> float:
    """Seconds since the epoch, from the system's clock (tests replace this)."""
    return time.time()


class Clock:
    """Maps between epoch seconds and trio's clock for one run."""

    def __init__(self) -> None:
        # The run's clock, read directly: trio.current_time() looks the
        # runner up and calls this same method (a send reads it once).
        self.trio_time = trio.lowlevel.current_clock().current_time
        self._offset = wall_time() - self.trio_time()

    def now(self) -> float:
        """Seconds since the epoch, as of trio's clock."""
        return self.trio_time() + self._offset

    def to_trio(self, wall: float) -> float:
        """The trio deadline at which epoch time ``wall`` is reached."""
        return wall - self._offset
