"""Deadlines of actors, with one task: ``handler_timeout`` and ``idle_timeout``.

Moving a cancel scope's deadline around every handler call costs trio a
deadline-heap update each time, on the path of every message. Here a
handler start writes the actor's ``handler_deadline`` and moves the actor
to the end of an insertion-ordered mapping (two C calls). Since every
deadline is "now + the same timeout", the mapping is in deadline order,
and the watch's sleep only has to be re-armed when it was empty.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

import attrs
import trio

from ._records import Message

log = logging.getLogger("actors.watchdog")


class Watched(Protocol):
    """What the :class:`Watchdog` reads and calls on an actor (a ``SessionActor``)."""

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
    """A deadline per actor, in the order they come due, and one task.

    Every deadline is "now plus a fixed timeout" (``idle_timeout``,
    ``handler_timeout``) on trio's monotonic clock, so deadlines come due
    in the order they were set: an insertion-ordered mapping is the queue.
    Setting one (``watch``) moves the actor to the end, forgetting it
    removes it, and the task sleeps until the first. No heap, and no stale entries: memory
    follows the actors watched, not the activations.

    Subclasses say what an actor's current deadline is, and what happens
    when it passes.
    """

    def __init__(self) -> None:
        self._due: OrderedDict[A, float] = OrderedDict()
        # Set by the task when it waits for a first entry; the one who adds
        # it sets the event.
        self._empty: trio.Event | None = None

    # -- what subclasses define --------------------------------------------

    def _deadline(self, actor: A) -> float | None:
        """The actor's current deadline, or None if it no longer waits for one."""
        raise NotImplementedError

    def _expire(self, actor: A) -> None:
        raise NotImplementedError

    # -- the queue ---------------------------------------------------------

    def _woken(self) -> None:
        """The task waited for a first entry: one came."""
        empty, self._empty = self._empty, None
        if empty is not None:
            empty.set()

    def forget(self, actor: A) -> None:
        """``actor`` left the registry: no deadline of it is watched."""
        self._due.pop(actor, None)

    @property
    def watched(self) -> int:
        """Actors with a deadline set."""
        return len(self._due)

    async def run(self) -> None:
        due = self._due
        while True:
            if not due:
                self._empty = empty = trio.Event()
                await empty.wait()
                continue
            await trio.sleep_until(next(iter(due.values())))
            now = trio.current_time()
            while due:
                actor, deadline = next(iter(due.items()))
                if deadline > now:
                    break
                del due[actor]
                current = self._deadline(actor)
                if current is not None and current <= now:
                    self._expire(actor)


class Watchdog(DeadlineWatch[Watched]):
    """Cancels handlers that outlive their deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts = 0

    def statistics(self) -> WatchdogStatistics:
        return WatchdogStatistics(watched=self.watched, timeouts=self.timeouts)

    def watch(self, actor: Watched) -> None:
        """``actor`` started a handler with ``actor.handler_deadline`` set."""
        # (Per handler call: two C calls, written out in both watches.)
        due = self._due
        due[actor] = actor.handler_deadline
        due.move_to_end(actor)
        if self._empty is not None:
            self._woken()

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
        due = self._due  # (as Watchdog.watch: once per park)
        due[actor] = actor.idle_deadline
        due.move_to_end(actor)
        if self._empty is not None:
            self._woken()

    def _deadline(self, actor: IdleWatched) -> float | None:
        return actor.idle_deadline if actor.parked else None

    def _expire(self, actor: IdleWatched) -> None:
        actor.unpark()
