"""Deadlines of actors, with one task and one heap: ``handler_timeout`` and ``idle_timeout``.

Moving a cancel scope's deadline around every handler call costs trio a
deadline-heap update each time, on the path of every message. Here a
handler start only writes the actor's ``handler_deadline``; the heap holds
at most one entry per actor, re-armed once per timeout period for a busy
actor. Since every deadline is "now + the same timeout", a new
entry is never earlier than the ones already queued, so the watchdog's sleep
only has to be re-armed when the heap was empty.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from typing import Generic, Protocol, TypeVar

import attrs
import trio

from ._records import Message

log = logging.getLogger("actors.watchdog")


class Watched(Protocol):
    """What the :class:`Watchdog` reads and calls on an actor (a ``SessionActor``)."""

    watched: bool  # the watchdog's heap has an entry for it; the watchdog sets it

    @property
    def session_id(self) -> str: ...

    @property
    def handler_running(self) -> bool: ...

    @property
    def handler_deadline(self) -> float:
        """Trio time by which the running handler must end."""

    @property
    def in_flight(self) -> Message | None: ...

    def time_out(self) -> None:
        """Cancel the running handler: it outlived its deadline."""


class IdleWatched(Protocol):
    """What the :class:`IdleWatch` reads and calls on an actor (a ``SessionActor``)."""

    idle_watched: bool  # the watch's heap has an entry for it; the watch sets it

    @property
    def parked(self) -> bool:
        """Whether its task waits for work."""

    @property
    def idle_deadline(self) -> float:
        """Trio time at which its wait for work ends."""

    def unpark(self) -> None:
        """End its wait for work (it passivates)."""


A = TypeVar("A")  # what a watch keeps deadlines of


@attrs.frozen
class WatchdogStatistics:
    """Actors watched now, and handlers timed out since start."""

    watched: int
    timeouts: int


class DeadlineWatch(Generic[A]):
    """A deadline per actor, with one task and one heap of at most one entry per actor.

    Subclasses say where the actor keeps its flag and its current deadline,
    and what happens when it passes. An actor's entry is re-armed to its
    current deadline when the old one comes due, so moving a deadline costs
    one attribute write, not a heap update.
    """

    def __init__(self) -> None:
        # (deadline, tie-breaker, actor); at most one entry per actor, the
        # ones whose flag is set.
        self._heap: list[tuple[float, int, A]] = []
        self._tie = itertools.count()
        self._armed = trio.Event()  # set when the heap gets its first entry
        self._compact_at = 64  # heap size at which stale entries are dropped

    # -- what subclasses define --------------------------------------------

    def _flag(self, actor: A) -> bool:
        raise NotImplementedError

    def _set_flag(self, actor: A, value: bool) -> None:
        raise NotImplementedError

    def _deadline(self, actor: A) -> float | None:
        """The actor's current deadline, or None if it no longer waits for one."""
        raise NotImplementedError

    def _expire(self, actor: A) -> None:
        raise NotImplementedError

    # -- the heap ---------------------------------------------------------

    def _push(self, actor: A, deadline: float) -> None:
        if self._flag(actor):
            return  # its entry will be re-armed to the new deadline when it comes due
        self._set_flag(actor, True)
        heap = self._heap
        if len(heap) >= self._compact_at:
            self._compact()
        heapq.heappush(heap, (deadline, next(self._tie), actor))
        if len(heap) == 1:
            self._armed.set()

    def forget(self, actor: A) -> None:
        """``actor`` left the registry; its entry goes at the next compaction."""
        self._set_flag(actor, False)

    def _compact(self) -> None:
        # Entries of actors that left (or stopped waiting) would otherwise
        # stay up to a whole timeout, holding the actor objects: memory must
        # follow the active actors, not the activations. Keep the live ones;
        # amortised O(1) per push, since the bound doubles.
        self._heap[:] = [entry for entry in self._heap if self._flag(entry[2])]
        heapq.heapify(self._heap)
        self._compact_at = max(64, 2 * len(self._heap))

    async def run(self) -> None:
        heap = self._heap
        while True:
            if not heap:
                self._armed = trio.Event()
                await self._armed.wait()
                continue
            await trio.sleep_until(heap[0][0])
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, actor = heapq.heappop(heap)
                if not self._flag(actor):
                    continue  # left the registry: forgotten
                deadline = self._deadline(actor)
                if deadline is None:
                    self._set_flag(actor, False)
                elif deadline <= now:
                    self._set_flag(actor, False)
                    self._expire(actor)
                else:  # a later wait of the same actor: re-arm to its deadline
                    heapq.heappush(heap, (deadline, next(self._tie), actor))


class Watchdog(DeadlineWatch[Watched]):
    """Cancels handlers that outlive their deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0

    def statistics(self) -> WatchdogStatistics:
        return WatchdogStatistics(watched=len(self._heap), timeouts=self.timeouts)

    def watch(self, actor: Watched) -> None:
        """``actor`` started a handler with ``actor.handler_deadline`` set."""
        if not actor.watched:  # (else its entry is re-armed when it comes due)
            self._push(actor, actor.handler_deadline)

    def _flag(self, actor: Watched) -> bool:
        return actor.watched

    def _set_flag(self, actor: Watched, value: bool) -> None:
        actor.watched = value

    def _deadline(self, actor: Watched) -> float | None:
        return actor.handler_deadline if actor.handler_running else None

    def _expire(self, actor: Watched) -> None:
        self.timeouts += 1
        in_flight = actor.in_flight
        log.warning(
            "handler of session %r (message %s) outlived handler_timeout: cancelled",
            actor.session_id,
            in_flight.id if in_flight is not None else "?",
        )
        actor.time_out()


class IdleWatch(DeadlineWatch[IdleWatched]):
    """Ends the idle waits of actors that had no work for ``idle_timeout``.

    An idle actor parks its task (no cancel scope, no channel): whoever
    brings work reschedules it, and this watch does when the wait is over.
    """

    def watch(self, actor: IdleWatched) -> None:
        """``actor`` parked with ``actor.idle_deadline`` set."""
        if not actor.idle_watched:  # (else its entry is re-armed when it comes due)
            self._push(actor, actor.idle_deadline)

    def _flag(self, actor: IdleWatched) -> bool:
        return actor.idle_watched

    def _set_flag(self, actor: IdleWatched, value: bool) -> None:
        actor.idle_watched = value

    def _deadline(self, actor: IdleWatched) -> float | None:
        return actor.idle_deadline if actor.parked else None

    def _expire(self, actor: IdleWatched) -> None:
        actor.unpark()
