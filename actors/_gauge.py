"""A count that tasks can wait on: the supervisor's busy, reserved and outstanding counts."""

from __future__ import annotations

import trio


class Gauge:
    """A count that tasks can wait on until it falls to a level.

    Cheaper than an AsyncValue on the hot path: changing it costs one
    truth test unless someone waits.
    """

    __slots__ = ("_waiters", "value")

    def __init__(self, value: int) -> None:
        self.value = value
        self._waiters: list[tuple[int, trio.Event]] = []  # (level, set when value <= level)

    def add(self, n: int) -> None:
        self.value += n
        if self._waiters:
            still = []
            for level, event in self._waiters:
                if self.value <= level:
                    event.set()
                else:
                    still.append((level, event))
            self._waiters = still

    async def wait_at_most(self, level: int) -> None:
        """Return once the count is ``level`` or less (at once if it is)."""
        if self.value <= level:
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        self._waiters.append((level, event))
        await event.wait()

    async def wait_zero(self) -> None:
        """Return once the count is zero or less."""
        await self.wait_at_most(0)
