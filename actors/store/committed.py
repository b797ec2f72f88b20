"""What both stores do alike: each operation of the protocol, run by the group committer.

``CommittedStore`` is the part of :class:`~actors.store.protocol.Store`
that a backend gets by giving the committer (committer.py) an object of
:class:`Operations`, its statements on its connection: every method queues
one operation and returns the committer's coroutine, not a coroutine of its
own (a task that waits resumes through no frame of the store's: this is
once per message). ``SqliteStore`` and ``PgStore`` add what differs: how
they open, read outside the committer, and close.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import trio

from .committer import Committer
from .records import (
    Aborted,
    Ack,
    AppendBatch,
    Appended,
    Claim,
    ControlRequest,
    DueWork,
    FailOutcome,
    Purged,
    Sent,
)


def ignore(_result: object) -> None:
    pass


class Operations(Protocol):
    """A backend's statements, one method per operation (see sqlite_ops.py)."""

    clock_now: Callable[[], float]

    @property
    def next_seq(self) -> int: ...
    def append(
        self,
        sessions: Sequence[str],
        bodies: Sequence[str | bytes],
        enqueued: Sequence[float],
        not_before: Sequence[float | None] | None,
        claimed: set[int],
        keys: Sequence[str | None] | None,
        key_retention: float,
        asked: Any = None,
    ) -> Appended: ...
    def claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool,
        bulk: int,
    ) -> Claim: ...
    @property
    def has_state(self) -> bool: ...  # False while no session can have state (see load_state)
    def load_state(self, session_id: str) -> str | None: ...
    def ack(self, ack: int | Ack) -> Sent | None: ...
    def ack_box(self, acks: list[int | Ack]) -> tuple[int, Sent | None]: ...
    def fail(
        self, message_id: int, error: str, retry_at: float, max_attempts: int
    ) -> FailOutcome: ...
    def release(self, message_id: int, uncount: bool, crashed: bool) -> None: ...
    def release_many(self, message_ids: list[int]) -> None: ...
    def nothing(self) -> None: ...
    def defer_head(self, session_id: str, until: float) -> bool: ...
    def next_due(self, after: float) -> float | None: ...
    def collect_due(self, after: float, now: float, limit: int) -> DueWork: ...
    def sessions_with_work(self, limit: int, exclude: frozenset[str]) -> list[tuple[str, int]]: ...
    def oldest_due(self, now: float) -> float | None: ...
    def retry_dead(self, message_id: int | None) -> Sent: ...
    def abort(self, message_id: int, unstarted: bool) -> Aborted | None: ...
    def purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Purged: ...
    def sweep_keys(self, before: float, limit: int) -> int: ...
    def heartbeat(self, value: str) -> None: ...
    def take_control(self, limit: int) -> list[ControlRequest]: ...
    def finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None: ...


class AckBox:
    """Acks submitted without waiting, written by one operation (``ack_soon``).

    Tasks append until the operation runs and seals the box (under the
    store's lock: that may be in a worker thread, after a failed group);
    later acks start a new box.
    """

    __slots__ = ("acks", "sealed")

    def __init__(self, ack: int | Ack) -> None:
        self.acks: list[int | Ack] = [ack]
        self.sealed = False


class CommittedStore:
    """The protocol's operations on ``ops``, through ``committer`` (see the module)."""

    def __init__(self, ops: Operations, committer: Committer) -> None:
        self._ops = ops
        self._committer = committer
        self._call = committer.call
        self._ack_box: AckBox | None = None  # the open box of ack_soon()
        self._ack_lock = threading.Lock()  # seals a box (see _write_box)

    def _drop_ack_box(self) -> None:
        # The committer failed: acks joining the open box would wait for nothing.
        self._ack_box = None

    @property
    def next_seq(self) -> int:
        return self._ops.next_seq

    @property
    def failed(self) -> trio.Event:
        return self._committer.failed

    @property
    def failure(self) -> BaseException | None:
        return self._committer.failure

    def use_clock(self, now: Callable[[], float]) -> None:
        self._ops.clock_now = now

    # -- sends, claims and acknowledgements ----------------------------------------

    def append(
        self,
        seal: Callable[[], AppendBatch],
        *,
        committed: Callable[[Appended], None] | None = None,
    ) -> Coroutine[Any, Any, Appended]:
        return self._committer.call_sealed(self._ops.append, seal, committed=committed)

    def claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool = False,
        bulk: int = 0,
    ) -> Coroutine[Any, Any, Claim]:
        return self._call(
            self._ops.claim_next, session_id, ack, now, max_attempts, alone, want_state, bulk
        )

    @property
    def may_have_state(self) -> bool:
        return self._ops.has_state

    def load_state(self, session_id: str) -> Coroutine[Any, Any, str | None]:
        return self._call(self._ops.load_state, session_id)

    def ack(self, ack: int | Ack) -> Coroutine[Any, Any, Sent | None]:
        return self._call(self._ops.ack, ack)

    def ack_soon(self, ack: int | Ack, done: Callable[[tuple[int, Sent | None]], None]) -> None:
        box = self._ack_box
        if box is not None:
            with self._ack_lock:
                if not box.sealed:
                    box.acks.append(ack)
                    return
        box = self._ack_box = AckBox(ack)
        self._committer.submit(self._write_box, box, done=done)

    def _write_box(self, box: AckBox) -> tuple[int, Sent | None]:
        # Sealed as its operation runs, under the lock: that may be in a
        # worker thread (a group that waits for a lock, or runs its
        # operations one by one after a failure).
        with self._ack_lock:
            box.sealed = True
            acks = box.acks
        return self._ops.ack_box(acks)

    def fail(
        self, message_id: int, error: str, retry_at: float, max_attempts: int
    ) -> Coroutine[Any, Any, FailOutcome]:
        return self._call(self._ops.fail, message_id, error, retry_at, max_attempts)

    def release(self, message_id: int, uncount: bool, crashed: bool) -> Coroutine[Any, Any, None]:
        return self._call(self._ops.release, message_id, uncount, crashed)

    def release_many(self, message_ids: list[int]) -> Coroutine[Any, Any, None]:
        return self._call(self._ops.release_many, message_ids)

    def release_many_soon(self, message_ids: list[int]) -> None:
        self._committer.submit(self._ops.release_many, message_ids, done=ignore)

    def defer_head(self, session_id: str, until: float) -> Coroutine[Any, Any, bool]:
        return self._call(self._ops.defer_head, session_id, until)

    def after_commits(self, done: Callable[[], None]) -> None:
        self._committer.submit(self._ops.nothing, done=lambda _: done())

    # -- the timer and the waiting line ------------------------------------------

    def next_due(self, after: float) -> Coroutine[Any, Any, float | None]:
        return self._call(self._ops.next_due, after)

    def collect_due(self, after: float, now: float, limit: int) -> Coroutine[Any, Any, DueWork]:
        return self._call(self._ops.collect_due, after, now, limit)

    def sessions_with_work(
        self, limit: int, exclude: frozenset[str]
    ) -> Coroutine[Any, Any, list[tuple[str, int]]]:
        return self._call(self._ops.sessions_with_work, limit, exclude)

    def oldest_due(self, now: float) -> Coroutine[Any, Any, float | None]:
        return self._call(self._ops.oldest_due, now)

    # -- operators' changes ---------------------------------------------------------

    def retry_dead(self, message_id: int | None) -> Coroutine[Any, Any, Sent]:
        return self._call(self._ops.retry_dead, message_id)

    def abort(
        self, message_id: int, unstarted: bool = False
    ) -> Coroutine[Any, Any, Aborted | None]:
        return self._call(self._ops.abort, message_id, unstarted)

    def purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Coroutine[Any, Any, Purged]:
        return self._call(self._ops.purge, session_id, dead_only, before, limit)

    def sweep_keys(self, before: float, limit: int) -> Coroutine[Any, Any, int]:
        return self._call(self._ops.sweep_keys, before, limit)

    # -- heartbeat and control table --------------------------------------------------

    def heartbeat(self, value: str) -> Coroutine[Any, Any, None]:
        return self._call(self._ops.heartbeat, value)

    def heartbeat_soon(self, value: str) -> None:
        self._committer.submit(self._ops.heartbeat, value, done=ignore)

    def take_control(self, limit: int) -> Coroutine[Any, Any, list[ControlRequest]]:
        return self._call(self._ops.take_control, limit)

    def finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> Coroutine[Any, Any, None]:
        return self._call(self._ops.finish_control, request_id, done_at, result, forget_before)
