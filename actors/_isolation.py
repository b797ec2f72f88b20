"""Running a crash suspect alone: one actor with a message in flight, the others held.

A message that was in flight when the process died, and whose next attempt
may be its last, runs alone (see the store's claim): if it kills the
process again, no bystander's attempt is charged for it.
"""

from __future__ import annotations

import logging
from typing import Generic, TypeVar

import attrs
import trio

from ._gauge import Gauge

log = logging.getLogger("actors.supervisor")

A = TypeVar("A")


@attrs.frozen
class IsolationStatistics:
    """The isolation right now."""

    held: bool  # an actor runs a crash suspect alone
    suspects_waiting: int  # actors waiting for their turn to run one alone


class Isolation(Generic[A]):
    """Who runs alone, if anyone; suspects take turns (FIFO).

    Invariant: while ``holder`` is set, no other actor claims (they check it
    before every claim and wait in ``wait``), and the holder claims only
    once ``busy`` and ``reserved`` reached zero (``enter``).
    """

    def __init__(self, busy: Gauge, reserved: Gauge) -> None:
        self._busy = busy
        self._reserved = reserved
        self.holder: A | None = None
        self._lock = trio.Lock()  # queues suspects, one at a time
        self._over = trio.Event()

    def statistics(self) -> IsolationStatistics:
        """A snapshot of the isolation."""
        return IsolationStatistics(
            held=self.holder is not None,
            suspects_waiting=self._lock.statistics().tasks_waiting,
        )

    async def enter(self, actor: A, session_id: str) -> None:
        """Become the only actor with a message in flight.

        Waits for any other isolation to end, stops every other actor from
        claiming, then waits until nothing else is in flight.
        """
        await self._lock.acquire()
        self.holder = actor
        self._over = trio.Event()
        log.warning(
            "session %r: a message that was in flight when the process died runs alone",
            session_id,
        )
        await self._reserved.wait_zero()
        await self._busy.wait_zero()

    def end(self, actor: A) -> None:
        """Let everyone claim again (no-op unless ``actor`` holds the isolation)."""
        if self.holder is actor:
            self.holder = None
            self._over.set()
            self._lock.release()

    async def wait(self, actor: A) -> None:
        """Hold ``actor``'s next claim while another actor runs alone."""
        while self.holder is not None and self.holder is not actor:
            await self._over.wait()
