"""The watchdog: ``handler_timeout`` for every actor, with one task and one heap.

Moving a cancel scope's deadline around every handler call costs trio a
deadline-heap update each time, which was a tenth of the loop's time per
message. Here a handler start only writes the actor's ``handler_deadline``;
the heap holds at most one entry per actor, re-armed once per timeout period
for a busy actor. Since every deadline is "now + the same timeout", a new
entry is never earlier than the ones already queued, so the watchdog's sleep
only has to be re-armed when the heap was empty.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from ._actor import SessionActor

log = logging.getLogger("actors.watchdog")


@attrs.frozen
class WatchdogStatistics:
    """Actors watched now, and handlers timed out since start."""

    watched: int
    timeouts: int


class Watchdog:
    """Cancels handlers that outlive their deadline."""

    def __init__(self) -> None:
        # (deadline, tie-breaker, actor); at most one entry per actor, the
        # ones whose `watched` is True.
        self._heap: list[tuple[float, int, SessionActor]] = []
        self._tie = itertools.count()
        self._armed = trio.Event()  # set when the heap gets its first entry
        self._compact_at = 64  # heap size at which stale entries are dropped
        self.timeouts = 0

    def statistics(self) -> WatchdogStatistics:
        return WatchdogStatistics(watched=len(self._heap), timeouts=self.timeouts)

    def watch(self, actor: SessionActor) -> None:
        """``actor`` started a handler with ``actor.handler_deadline`` set."""
        if actor.watched:
            return  # its entry will be re-armed to the new deadline when it comes due
        actor.watched = True
        heap = self._heap
        if len(heap) >= self._compact_at:
            self._compact()
        heapq.heappush(heap, (actor.handler_deadline, next(self._tie), actor))
        if len(heap) == 1:
            self._armed.set()

    def forget(self, actor: SessionActor) -> None:
        """``actor`` left the registry; its entry goes at the next compaction."""
        actor.watched = False

    def _compact(self) -> None:
        # Entries of actors that left (or stopped running handlers) would
        # otherwise stay up to a whole timeout, holding the actor objects:
        # memory must follow the active actors, not the activations. Keep
        # the live ones; amortised O(1) per push, since the bound doubles.
        self._heap[:] = [entry for entry in self._heap if entry[2].watched]
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
                if not actor.watched:
                    continue  # left the registry: forgotten
                if not actor.handler_running:
                    actor.watched = False
                elif actor.handler_deadline <= now:
                    actor.watched = False
                    self.timeouts += 1
                    in_flight = actor.in_flight
                    log.warning(
                        "handler of session %r (message %s) outlived handler_timeout: cancelled",
                        actor.session_id,
                        in_flight.id if in_flight is not None else "?",
                    )
                    actor.time_out()
                else:  # a later handler of the same actor: wait for its deadline
                    heapq.heappush(heap, (actor.handler_deadline, next(self._tie), actor))
