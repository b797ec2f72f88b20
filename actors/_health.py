"""Health: is the system making progress? (``System.health()``, ``actors health``).

A process that is up is not healthy by that alone: the seed's worker said OK
for weeks while nothing completed. Here a system is unhealthy when a message
that is due (pending and not waiting for a delay or a retry, or in flight)
has waited longer than ``stall_after`` seconds **and** no message completed
(was acknowledged or dead-lettered) within the last ``stall_after`` seconds.
Idle is healthy; busy and completing is healthy; waiting work with nothing
completing is a stall.

The running system also writes a :class:`Heartbeat` into the ``meta`` table
every ``status_interval`` seconds, through the store (so it rides in a group
commit), for the command line in another process: a heartbeat that stopped
coming means the system's loop or its store is stuck.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._clock import Clock
from ._errors import StoreError
from ._records import SystemStatistics

if TYPE_CHECKING:
    from .store import Store


@attrs.frozen(kw_only=True)
class Health:
    """Whether a system makes progress (``await system.health()``, ``actors health``).

    Attributes:
      healthy: False when a due message has waited more than ``stall_after``
        seconds and no message completed within the last ``stall_after``.
      reason: one line saying why.
      checked_at: when the check was made, seconds since the epoch.
      stall_after: the threshold of this check, in seconds.
      oldest_pending_age: seconds since the oldest due message was sent
        (due: pending and not waiting for a delay or a retry, or in flight);
        None when no message is due.
      last_progress_age: seconds since a message last completed (was
        acknowledged or dead-lettered), or since the system started if none
        has; to within ``status_interval``.
      pending, in_flight, dead: as in SystemStatistics.
      processed, dead_lettered: since the system started.
    """

    healthy: bool
    reason: str
    checked_at: float
    stall_after: float
    oldest_pending_age: float | None
    last_progress_age: float
    pending: int
    in_flight: int
    dead: int
    processed: int
    dead_lettered: int


def judge(
    *, oldest_pending_age: float | None, last_progress_age: float, stall_after: float
) -> tuple[bool, str]:
    """The rule, in one place: ``(healthy, reason)``."""
    if oldest_pending_age is None:
        return True, "idle: no message is due"
    waited = f"the oldest due message has waited {seconds_text(oldest_pending_age)}"
    if oldest_pending_age <= stall_after:
        return True, f"ok: {waited}"
    if last_progress_age <= stall_after:
        return True, f"ok: a message completed {seconds_text(last_progress_age)} ago; {waited}"
    return False, (
        f"stalled: {waited} and no message has completed for"
        f" {seconds_text(last_progress_age)} (stall_after {seconds_text(stall_after)})"
    )


def seconds_text(seconds: float) -> str:
    """A duration for people: ``0.4s``, ``12s``, ``3m04s``, ``2h05m``, ``3d04h``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


@attrs.frozen(kw_only=True)
class Heartbeat:
    """What a running system last wrote about itself (``meta`` key ``heartbeat``).

    Times are seconds since the epoch. ``interval`` is the system's
    ``status_interval``: a heartbeat much older than that means the system's
    loop or its store is stuck. ``stopping``: the system began to shut down
    (written at once when the stop begins, and in every heartbeat after):
    while it runs out its grace it is not healthy. A heartbeat written by
    a version without the field reads as not stopping.
    """

    at: float
    interval: float
    started_at: float
    last_progress_at: float
    pid: int
    host: str
    processed: int
    dead_lettered: int
    failed_attempts: int
    restarts: int
    pending: int
    in_flight: int
    dead: int
    stopping: bool = False

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: object) -> Heartbeat | None:
        """Parse a stored heartbeat; None if it is missing or not one.

        A field with a default (``stopping``) may be missing: older versions
        did not write it.
        """
        if not isinstance(text, str):
            return None
        try:
            fields: Any = json.loads(text)
            beat = cls(
                **{
                    f.name: fields[f.name]
                    for f in attrs.fields(cls)
                    if f.name in fields or f.default is attrs.NOTHING
                }
            )
        except (ValueError, TypeError, KeyError):
            return None
        return beat if isinstance(beat.stopping, bool) else None


@attrs.frozen
class HealthMonitorStatistics:
    """What the health monitor has seen since the system started."""

    checks: int
    heartbeats: int
    last_progress_at: float


class HealthMonitor:
    """Notices progress in a system's counters; builds Health and Heartbeat records.

    Progress is sampled (at each heartbeat and each check): a completion is
    dated to the first look that sees the counters moved.
    """

    def __init__(self, statistics: Callable[[], SystemStatistics], clock: Clock) -> None:
        self._statistics = statistics
        self._clock = clock
        self.started_at = clock.now()
        self.last_progress_at = self.started_at
        self._completed = 0  # processed + dead_lettered at the last look
        self._checks = 0
        self._heartbeats = 0
        # Set once when the system begins to stop; every heartbeat after says so.
        self.stopping = False

    def observe(self) -> SystemStatistics:
        """The system's statistics now, noting any progress since the last look."""
        stats = self._statistics()
        completed = stats.processed + stats.dead_lettered
        if completed != self._completed:
            self._completed = completed
            self.last_progress_at = self._clock.now()
        return stats

    def check(self, stall_after: float, oldest_due: float | None, *, closed: bool) -> Health:
        """The Health now, given the ``enqueued_at`` of the oldest due message."""
        self._checks += 1
        stats = self.observe()
        now = self._clock.now()
        oldest_age = None if oldest_due is None else max(now - oldest_due, 0.0)
        progress_age = max(now - self.last_progress_at, 0.0)
        if closed:
            healthy, reason = False, "the system is shutting down"
        else:
            healthy, reason = judge(
                oldest_pending_age=oldest_age,
                last_progress_age=progress_age,
                stall_after=stall_after,
            )
        return Health(
            healthy=healthy,
            reason=reason,
            checked_at=now,
            stall_after=stall_after,
            oldest_pending_age=oldest_age,
            last_progress_age=progress_age,
            pending=stats.pending,
            in_flight=stats.in_flight,
            dead=stats.dead,
            processed=stats.processed,
            dead_lettered=stats.dead_lettered,
        )

    def heartbeat(self, interval: float) -> Heartbeat:
        """The heartbeat to write now."""
        stats = self.observe()
        return Heartbeat(
            at=self._clock.now(),
            interval=interval,
            started_at=self.started_at,
            last_progress_at=self.last_progress_at,
            pid=os.getpid(),
            host=socket.gethostname(),
            processed=stats.processed,
            dead_lettered=stats.dead_lettered,
            failed_attempts=stats.failed_attempts,
            restarts=stats.restarts,
            pending=stats.pending,
            in_flight=stats.in_flight,
            dead=stats.dead,
            stopping=self.stopping,
        )

    def begin_stop(self, store: Store, interval: float) -> None:
        """The system begins to stop: write a heartbeat that says so, now.

        Without waiting for the next beat: a stop's grace can last long
        (a deploy's 30 s), and ``actors health`` in another process must not
        call the system healthy meanwhile, as ``System.health()`` does not.
        Queued without waiting (the caller is synchronous, and may be a
        cancelled task); the store runs its operations in order, so no
        beat queued later can say the opposite, and the store's close
        commits what is queued.
        """
        if self.stopping:
            return
        self.stopping = True
        # A store that failed or is closed refuses it: the system stops with that error.
        with contextlib.suppress(StoreError):
            store.heartbeat_soon(self.heartbeat(interval).to_json())

    async def run(self, store: Store, interval: float) -> None:
        """Write a heartbeat every ``interval`` seconds, the first one after ``interval``.

        Not at once: the system's first write stays its own (a claim), and a
        test that counts the commits of its first moments sees no extra one.
        Each beat first checks that the database file is still the one the
        store opened (``Store.check_file``).
        """
        while True:
            await trio.sleep(interval)
            # A database file deleted or replaced under the system would
            # swallow every acknowledged message: stop (StoreError).
            store.check_file()
            await store.heartbeat(self.heartbeat(interval).to_json())
            self._heartbeats += 1

    def statistics(self) -> HealthMonitorStatistics:
        """Checks made and heartbeats written since start, and the last progress seen."""
        return HealthMonitorStatistics(
            checks=self._checks,
            heartbeats=self._heartbeats,
            last_progress_at=self.last_progress_at,
        )
