"""The router: intake of sends, group commit, delivery to actors.

``send()`` appends to the open batch and waits for it. The router task
submits the batch as one store operation, sealed as late as possible
(``Store.append``): the batch is taken, and its actors' reservations
made, only when the committer takes the group that writes it, right before
the transaction. Every send made while the committer was busy or waited for
the loop to be idle still joins it; taken at submission, as before, those
waited for the next transaction, so a send could wait for two. Then the
router wakes every sender of the batch at once and tells the supervisor
about the new work. While one batch commits, the next one fills: the more
senders, the larger the batches, and the fewer commits per message.

The batch's ``ask`` replies and the outstanding count (``drain()``) are
registered as its commit is reported, before any task resumes
(``Store.append(committed=...)``): a claim in the same transaction may take a
message of the batch, and its handler may answer as soon as its actor runs.

Delivery never blocks on a slow session: a notice only raises an integer
(the actor claims the work from the database when it is ready), messages
are handed (inserted claimed) only to an actor with room (``mailbox_size``),
and a session without an actor gets one or waits for a slot.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import attrs
import trio

from ._codec import decode_body
from ._errors import StoreError, SystemClosedError
from ._records import new_message
from ._wake import WOKEN
from .store import AppendBatch, Appended, Store

log = logging.getLogger("actors.router")

if TYPE_CHECKING:
    from ._actor import SessionActor
    from ._reply import Reply
    from ._supervisor import Supervisor
    from ._timer import Timer


class Batch:
    """Sends that commit together. Senders wait in ``wait()`` until ``finish()``.

    Waiting senders are rescheduled directly (no Event and its parking lot:
    this is once per message).
    """

    __slots__ = (
        "bodies",
        "delayed",
        "duplicates",
        "enqueued",
        "error",
        "finished",
        "first_id",
        "keys",
        "not_before",
        "replies",
        "sessions",
        "waiters",
    )

    def __init__(self) -> None:
        self.sessions: list[str] = []
        self.bodies: list[str | bytes] = []
        self.enqueued: list[float] = []
        self.not_before: list[float | None] = []
        self.delayed = False
        self.finished = False
        self.waiters: list[trio.lowlevel.Task] = []
        self.first_id = 0
        self.error: BaseException | None = None
        # Idempotency keys, one per send, once any send of the batch has one.
        self.keys: list[str | None] | None = None
        # index -> id of the message first sent with that key (not inserted).
        self.duplicates: dict[int, int] | None = None
        # index -> the reply an ask() waits for; registered before delivery.
        self.replies: dict[int, Reply] | None = None

    def message_id(self, index: int) -> int:
        """The id ``send()`` returns for the send at ``index`` (once committed)."""
        dups = self.duplicates
        if dups is not None and index in dups:
            return dups[index]
        return self.first_id + index

    def __len__(self) -> int:
        return len(self.sessions)

    # KI-protected: registered in ``waiters`` and interrupted before it
    # parks, the task would be rescheduled by finish() after it exited
    # (TrioInternalError). Protected, trio delivers a Ctrl-C to the main
    # task instead, and this wait is cancelled like any other.
    @trio.lowlevel.enable_ki_protection
    async def wait(self) -> None:
        """Wait until the batch committed or failed (``first_id`` / ``error``).

        A cancelled sender stops waiting; its message may or may not commit.
        """
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        # Which batch the task waits for: trio clears it whenever the task
        # is rescheduled, a cancellation included (documented for
        # wait_task_rescheduled), so finish() passes a cancelled waiter by
        # and no closure is built per wait (once per message, and what the
        # wait allocates is what the collector promotes while it waits).
        task.custom_sleep_data = self
        self.waiters.append(task)
        await trio.lowlevel.wait_task_rescheduled(_abort_wait)

    def finish(self) -> None:
        """The batch committed (``first_id`` set) or failed (``error`` set): wake the senders."""
        self.finished = True
        waiters, self.waiters = self.waiters, []
        for task in waiters:
            # (Not a waiter cancelled since, wherever it waits now; and a
            # task that waited, was cancelled and waits again is listed
            # twice but woken once: rescheduling clears the mark.)
            if task.custom_sleep_data is self:
                trio.lowlevel.reschedule(task, WOKEN)


def _abort_wait(_: object) -> trio.lowlevel.Abort:
    # A waiting sender is cancelled: trio reschedules it with the Cancelled,
    # which clears its mark (Batch.finish then passes it by).
    return trio.lowlevel.Abort.SUCCEEDED


@attrs.frozen
class RouterStatistics:
    """Counters of the router since start."""

    sends: int  # messages committed
    batches: int  # batches committed (one store operation each)
    handoffs: int  # messages inserted claimed for an idle actor
    duplicates: int  # keyed sends answered with the first message's id
    open_batch: int  # sends waiting for the next commit
    closed: bool


class Router:
    """Single task between senders and the store."""

    def __init__(
        self, store: Store, supervisor: Supervisor, timer: Timer, key_retention: float = 0.0
    ) -> None:
        self._store = store
        self._key_retention = key_retention
        self._sup = supervisor
        self._timer = timer
        self._open: Batch | None = None  # filling; taken whole by _seal()
        self._committing: Batch | None = None  # sealed (_seal), its transaction running
        # The reservations of the sealed batch, and the indices inserted claimed.
        self._handoffs: dict[SessionActor, list[int]] = {}
        self._claimed: set[int] = set()
        self._wakeup = trio.Event()  # set when a batch opens or the router closes
        self._closed = False
        self._failure: BaseException | None = None
        self.finished = trio.Event()
        self.sends = 0
        self.batches = 0
        self.handoffs = 0  # messages inserted claimed for an idle actor
        self.duplicates = 0  # keyed sends that found their key (nothing persisted)

    def add(
        self,
        session_id: str,
        body: str | bytes,
        enqueued: float,
        not_before: float | None,
        key: str | None = None,
        reply: Reply | None = None,
    ) -> tuple[Batch, int]:
        """Append one send to the open batch; returns it and the send's index.

        Raises:
          SystemClosedError: the router no longer accepts sends.
          StoreError: the store failed earlier.
        """
        batch = self._batch()
        index = len(batch.sessions)
        batch.sessions.append(session_id)
        batch.bodies.append(body)
        batch.enqueued.append(enqueued)
        batch.not_before.append(not_before)
        if not_before is not None:
            batch.delayed = True
        if key is not None:
            if batch.keys is None:
                batch.keys = [None] * index
            batch.keys.append(key)
        elif batch.keys is not None:
            batch.keys.append(None)
        if reply is not None:
            if batch.replies is None:
                batch.replies = {}
            batch.replies[index] = reply
        return batch, index

    def add_many(
        self,
        sessions: list[str],
        bodies: list[str | bytes],
        enqueued: float,
        keys: list[str | None] | None,
    ) -> tuple[Batch, int]:
        """Append sends, all enqueued at ``enqueued`` and due at once, to the
        open batch (contiguous); returns it and the first send's index.

        ``keys``, if given, has one entry per send (None for none). Raises as
        :meth:`add` does.
        """
        batch = self._batch()
        index = len(batch.sessions)
        count = len(sessions)
        batch.sessions += sessions
        batch.bodies += bodies
        batch.enqueued += [enqueued] * count
        batch.not_before += [None] * count
        if keys is not None:
            if batch.keys is None:
                batch.keys = [None] * index
            batch.keys += keys
        elif batch.keys is not None:
            batch.keys += [None] * count
        return batch, index

    def _batch(self) -> Batch:
        if self._failure is not None:
            raise StoreError(f"the database failed: {self._failure}") from self._failure
        if self._closed:
            raise SystemClosedError("the system is shutting down and accepts no more messages")
        batch = self._open
        if batch is None:
            batch = self._open = Batch()
            self._wakeup.set()
        return batch

    async def flushed(self) -> None:
        """Return once every send added before this call has committed (or failed)."""
        for batch in (self._committing, self._open):
            if batch is not None:
                await batch.wait()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> RouterStatistics:
        """Counters since start, and the size of the batch being filled."""
        return RouterStatistics(
            sends=self.sends,
            batches=self.batches,
            handoffs=self.handoffs,
            duplicates=self.duplicates,
            open_batch=len(self._open) if self._open is not None else 0,
            closed=self._closed,
        )

    def close(self) -> None:
        """Accept no more sends; the router task exits once the open batch is committed."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Commit batches until closed (or until the store fails, which is raised)."""
        store = self._store
        try:
            while True:
                if self._open is None:
                    if self._closed:
                        return
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                # The batch is taken by _seal(), as the committer starts the
                # transaction: every send made until then joins it.
                try:
                    first, duplicates = await store.append(self._seal, committed=self._committed)
                except StoreError as exc:
                    failed = self._committing or self._open
                    log.error(
                        "a batch of %d send(s) failed to commit: %s",
                        len(failed) if failed is not None else 0,
                        exc,
                    )
                    self._fail(self._committing, exc)
                    raise
                batch, self._committing = self._committing, None
                assert batch is not None
                self._after_commit(batch, first, duplicates)
                del batch  # nothing of this batch waits with the task for the next one
        finally:
            # However the task ends, no sender may wait for a batch forever.
            self._closed = True
            if self._open is not None:
                self._open.error = SystemClosedError(
                    "the system stopped before this send committed"
                )
                self._open.finish()
                self._open = None
            self.finished.set()

    def _after_commit(self, batch: Batch, first: int, duplicates: dict[int, int] | None) -> None:
        """The batch committed: wake its senders, hand its claimed messages over, deliver."""
        handoffs, claimed = self._handoffs, self._claimed
        self._handoffs, self._claimed = {}, set()
        batch.finish()  # (first_id and duplicates were set by _committed())
        self.batches += 1
        self.sends += len(batch) - (len(duplicates) if duplicates else 0)
        self.handoffs += len(claimed)
        if duplicates:
            self.duplicates += len(duplicates)
            log.debug("%d keyed send(s) were duplicates: nothing persisted", len(duplicates))
        bodies, enqueued = batch.bodies, batch.enqueued
        for actor, indices in handoffs.items():
            session_id = actor.session_id
            self._sup.hand_over(
                actor,
                [
                    # (id, session_id, body, attempt, enqueued_at)
                    new_message(first + i, session_id, decode_body(bodies[i]), 1, enqueued[i])
                    for i in indices
                    if i in claimed
                ],
            )
        self._deliver(batch, first)

    def _seal(self) -> AppendBatch:
        """Take the open batch for the transaction starting now: what Store.append inserts.

        Run by the store on the trio thread as the committer takes the group
        (Store.append), so the batch holds every send made until then,
        and the reservations are made against the actors' state right
        before the transaction. The operation runs last in its group: an
        actor's claim queued earlier runs before the insert, and so cannot
        see the messages inserted claimed for it.
        """
        batch = self._open
        assert batch is not None, "the router seals only a batch it submitted"
        self._open = None
        self._committing = batch
        # Claim on delivery: the messages of each session whose actor is
        # caught up (busy or idle) are inserted claimed and handed to the
        # actor, which then needs no claim of its own. (Not with keys: a
        # duplicate is not inserted at all.)
        handoffs = (
            {} if batch.delayed or batch.keys is not None else self._sup.reserve(batch.sessions)
        )
        # (Store.append narrows it: a claimed message must not overtake.)
        claimed = {i for indices in handoffs.values() for i in indices} if handoffs else set()
        self._handoffs, self._claimed = handoffs, claimed
        return (
            batch.sessions,
            batch.bodies,
            batch.enqueued,
            batch.not_before if batch.delayed else None,
            claimed,
            batch.keys,
            self._key_retention,
            batch.replies.keys() if batch.replies is not None else None,
        )

    def _committed(self, result: Appended) -> None:
        # Before any task resumes: a claim in the same transaction may have
        # taken a message of the batch, and its actor may answer an ask, or
        # ack, as soon as it runs.
        batch = self._committing
        assert batch is not None
        batch.first_id, duplicates = result
        batch.duplicates = duplicates
        sup = self._sup
        sup.outstanding.add(len(batch) - (len(duplicates) if duplicates else 0))
        if batch.replies is not None:
            replies = sup.replies
            for index, reply in batch.replies.items():
                replies[batch.message_id(index)] = reply

    def _fail(self, batch: Batch | None, exc: BaseException) -> None:
        self._failure = exc
        self._closed = True
        # Nothing was inserted claimed: end the reservations (an actor
        # started for them runs, and finds nothing handed).
        handoffs, self._handoffs = self._handoffs, {}
        for actor in handoffs:
            self._sup.hand_over(actor, [])
        for b in (batch, self._open):
            if b is not None:
                b.error = exc
                b.finish()
        self._open = None

    def _deliver(self, batch: Batch, first: int) -> None:
        sup = self._sup
        dups = batch.duplicates
        # One notice per session per batch: the highest seq is enough, since
        # an actor claims everything up to it in order from the database.
        last: dict[str, int] = {}
        if batch.delayed or dups:
            earliest = math.inf
            for i, (session_id, nb) in enumerate(
                zip(batch.sessions, batch.not_before, strict=True)
            ):
                if dups and i in dups:
                    continue
                if nb is None:
                    last[session_id] = first + i
                else:
                    earliest = min(earliest, nb)
            if math.isfinite(earliest):
                self._timer.schedule(earliest)
        else:  # (a later send of a session overwrites its earlier seq)
            last = dict(zip(batch.sessions, range(first, first + len(batch)), strict=True))
        for session_id, seq in last.items():
            sup.ensure(session_id, seq)
