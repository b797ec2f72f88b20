"""``MemoryStore``: the ``Store`` protocol in memory, for unit tests of the supervisor and actor.

As procrastinate's ``InMemoryConnector`` does for its workers: the runtime
above the store boundary runs on it unchanged, without SQLite, and a test
can stop time at any store operation to try an interleaving.

What it keeps is what the SQLite store keeps and the runtime reads: the
messages (id, seq, state, attempts, not_before, last_error, crashed, alone,
key, enqueued_at, the encoded body), the sessions' states, the idempotency
keys, the heartbeat and the control table. Each operation does what its
namesake in ``actors/store/sqlite_ops.py`` and ``sqlite_claim.py`` does
(per-session FIFO by seq, a claim that counts its attempt and takes fresh
messages behind the head in bulk, fail to a retry or a dead letter,
releases that give an attempt back, an append that inserts claimed only
when nothing of the session is pending, ...); where the two could differ,
the SQLite store is the reference.

The protocol's contract, kept here:

- **Submission order.** Operations commit one at a time, in the order they
  were called (a queue). An ``append`` is sealed late: ``seal()`` runs when
  it is called, as when the SQLite committer takes a group that holds
  everything queued before it, and the insert commits after those; an
  append held before its seal is sealed when released, and queued then.
  ``ack_soon`` joins the open box while that box waits in the queue.
- **Durable when it returns**: trivially; what an ``await`` returns has
  been applied.
- **Not cancellable.** A caller waiting for its operation (a held one, or
  one behind it) waits on, cancelled or not, and sees the cancellation at
  its next checkpoint. An operation that is not held commits at once and
  its caller passes a schedule point that no cancellation interrupts, as
  the SQLite store's inline mode (under a MockClock) does.
- **Fail fast, fail loud.** An operation that fails (see ``fail_next`` and
  ``Held.fail``) writes nothing, raises StoreError to its caller (or is
  dropped, for the ``..._soon`` ones), sets ``failed`` and ``failure``; every
  later call raises StoreError.

Control for interleavings: ``store.hold("claim_next")`` makes the next call
of that operation wait (uncommitted) until the test calls
``held.release()`` (or ``held.fail()``); ``await held.reached()`` returns
once it waits at the head of the queue (everything called before it has
committed). Operations called after a held one wait behind it, in order;
only a held ``append`` not yet sealed lets them pass, as a sealed
operation of the SQLite store's committer does.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from actors._codec import decode_body, encode_body
from actors._errors import StoreError
from actors._records import DeadLetter, Message, new_message
from actors.store import (
    Aborted,
    Ack,
    AppendBatch,
    Appended,
    BatchAck,
    Claim,
    ControlRequest,
    DueWork,
    FailOutcome,
    MessageState,
    Purged,
    Sent,
    StoreStatistics,
)

if TYPE_CHECKING:
    from actors.store import Store
    from actors.store.protocol import StartMarks

PENDING, IN_FLIGHT, DEAD = MessageState.PENDING, MessageState.IN_FLIGHT, MessageState.DEAD

# As large as the SQLite store's default (SQLITE_LIMIT_LENGTH less room for the row).
MAX_VALUE_BYTES = 1_000_000_000 - 1024


@attrs.define
class Row:
    """One message as the store keeps it (the SQLite store's ``messages`` row)."""

    id: int
    session_id: str
    seq: int | None  # None while delayed: it gets its seq when the delay ends
    state: MessageState
    attempts: int
    body: str | bytes  # encoded
    enqueued_at: float
    not_before: float | None = None
    last_error: str | None = None
    crashed: bool = False
    alone: bool = False
    key: str | None = None

    @property
    def queued(self) -> bool:
        """In its session's queue: pending or in flight, not delayed."""
        return self.state is not DEAD and self.seq is not None


@attrs.define
class _Control:
    id: int
    command: str
    args: str
    at: float
    result: str | None = None
    done_at: float | None = None


class MemoryStartMarks:
    """The start table in memory (``StartMarks``): which handler each slot started last."""

    def __init__(self) -> None:
        self.marks: dict[int, int] = {}  # {slot: message id}
        self.started: list[int] = []  # every mark, in order: the handlers that started
        self._free: list[int] = []
        self._next = 0

    def acquire(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next
        self._next += 1
        return slot

    def mark(self, slot: int, message_id: int) -> None:
        self.marks[slot] = message_id
        self.started.append(message_id)

    def release(self, slot: int) -> None:
        self.marks.pop(slot, None)
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        """Slots acquired and not released."""
        return self._next - len(self._free)


class Held:
    """The next call of an operation, held until the test releases it (``MemoryStore.hold``)."""

    def __init__(
        self, store: MemoryStore, name: str, after_seal: bool, *, passing: bool = False
    ) -> None:
        self.name = name
        self.after_seal = after_seal
        self._store = store
        self._reached = trio.Event()
        self.released = passing  # (a call let through: the holds before the nth)
        self.error: str | None = None  # fail() with this reason
        self._op: _Op | None = None

    @property
    def is_reached(self) -> bool:
        """The held call was made and waits (at the head of the queue)."""
        return self._reached.is_set()

    async def reached(self) -> None:
        """Wait until the held call was made and everything called before it committed."""
        await self._reached.wait()

    def release(self) -> None:
        """Let the held operation commit (now, if it was reached)."""
        assert not self.released, "released twice"
        self.released = True
        self._store._released(self)

    def fail(self, reason: str = "injected failure") -> None:
        """Let the held operation fail instead: its transaction writes nothing."""
        self.error = reason
        self.release()


class _Op:
    __slots__ = (
        "args",
        "done",
        "error",
        "finished",
        "fn",
        "hold",
        "name",
        "result",
        "seal",
        "task",
    )

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        done: Callable[[Any], None] | None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.args = args
        self.done = done
        self.hold: Held | None = None
        self.seal: Callable[[], tuple[Any, ...]] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.task: trio.lowlevel.Task | None = None


class _AckBox:
    __slots__ = ("acks", "sealed")

    def __init__(self, ack: int | Ack) -> None:
        self.acks: list[int | Ack] = [ack]
        self.sealed = False


def _abort_failed(_: object) -> trio.lowlevel.Abort:
    # Not cancellable: the caller waits for the outcome (see the module).
    return trio.lowlevel.Abort.FAILED


def _gave_up(row: Row) -> str:
    """Why a head whose attempts were used up without an outcome is dead-lettered
    (the SQLite store's words: sqlite_claim._gave_up)."""
    if row.crashed and row.alone:
        reason = (
            f"gave up after {row.attempts} attempt(s); the process died during the last "
            "one, which ran alone: this message kills the process"
        )
    elif row.crashed:
        reason = (
            f"gave up after {row.attempts} attempt(s); the process died during the last "
            "one (other messages were in flight too, so it may not be the cause)"
        )
    else:
        reason = f"gave up after {row.attempts} attempt(s); the last one ended without an outcome"
    if row.last_error:
        reason += f"; the error before that:\n{row.last_error}"
    return reason


class MemoryStore:
    """The ``Store`` protocol in memory (see the module)."""

    def __init__(
        self,
        *,
        path: str = ":memory:",
        max_value_bytes: int = MAX_VALUE_BYTES,
        starts: bool = True,
    ) -> None:
        self._path = path
        self._max_value_bytes = max_value_bytes
        self._starts = MemoryStartMarks() if starts else None
        self.messages: dict[int, Row] = {}
        self.states: dict[str, str] = {}
        self.keys: dict[tuple[str, str], tuple[int, float | None]] = {}  # -> (id, done_at)
        self.control: dict[int, _Control] = {}
        self.heartbeat_value: str | None = None
        self._next_seq = 1  # ids and seqs: one counter, as in the SQLite store
        self._control_ids = itertools.count(1)
        self.clock_now: Callable[[], float] | None = None
        # Operations not yet committed, in commit order; appends held before
        # their seal wait aside (others pass them).
        self._queue: deque[_Op] = deque()
        self._sealing: list[_Op] = []
        self._running = False
        self._holds: dict[str, deque[Held]] = {}
        self._ack_box: _AckBox | None = None
        self._failed = trio.Event()
        self._failure: BaseException | None = None
        self._closed = False
        # What committed, in order: the operation's name (for assertions on order).
        self.committed: list[str] = []

    # -- control for tests ---------------------------------------------------------

    def hold(self, name: str, *, nth: int = 1, after_seal: bool = False) -> Held:
        """Hold back the ``nth`` call from now of operation ``name`` (a method name).

        The calls before it pass; several holds of one name hold its later
        calls in turn. ``after_seal`` (``append`` only): run ``seal()`` at the
        call, as the SQLite committer does when it takes the group, and hold
        the insert; otherwise an append is held before its seal.
        """
        assert hasattr(self, name), name
        assert not after_seal or name == "append"
        for _ in range(nth - 1):
            self._holds.setdefault(name, deque()).append(Held(self, name, False, passing=True))
        held = Held(self, name, after_seal)
        self._holds.setdefault(name, deque()).append(held)
        return held

    def fail_next(self, name: str, reason: str = "injected failure") -> None:
        """Make the next call of operation ``name`` fail (StoreError; the store fails)."""
        held = self.hold(name)
        held.error = reason
        held.released = True

    def put(
        self,
        session_id: str,
        body: Any,
        *,
        state: MessageState = PENDING,
        attempts: int = 0,
        not_before: float | None = None,
        delayed: bool = False,
        crashed: bool = False,
        last_error: str | None = None,
        key: str | None = None,
        enqueued_at: float = 0.0,
        raw: str | bytes | None = None,
    ) -> Row:
        """Insert a message directly (committed, no operation): set up a test's database.

        ``delayed``: not yet in its queue (no seq) until ``not_before``.
        ``raw``: the stored body as is (an undecodable one, say).
        """
        msg_id = self._take_seq()
        row = Row(
            id=msg_id,
            session_id=session_id,
            seq=None if delayed else msg_id,
            state=state,
            attempts=attempts,
            body=raw if raw is not None else encode_body(body, self._max_value_bytes),
            enqueued_at=enqueued_at,
            not_before=not_before,
            last_error=last_error,
            crashed=crashed,
            key=key,
        )
        self.messages[msg_id] = row
        if key is not None:
            self.keys[(session_id, key)] = (msg_id, None)
        return row

    def recover(self) -> int:
        """As the SQLite store's open after the process died (sqlite_schema.recover).

        Every message in flight goes back to pending: per session, those up
        to the last one whose handler started (by the start marks) keep
        their attempt and are marked crashed; the others get it back.
        Without start marks every one counts as started. Returns how many.
        """
        in_flight = [r for r in self.messages.values() if r.state is IN_FLIGHT]
        started: set[int] = set()
        if self._starts is None:
            started = {r.id for r in in_flight}
        else:
            for message_id in self._starts.marks.values():
                mark = self.messages.get(message_id)
                if mark is not None and mark.state is IN_FLIGHT and mark.seq is not None:
                    started |= {
                        r.id
                        for r in in_flight
                        if r.session_id == mark.session_id
                        and r.seq is not None
                        and r.seq <= mark.seq
                    }
            self._starts.marks.clear()
        for row in in_flight:
            row.state = PENDING
            if row.id in started:
                row.crashed = True
            else:
                row.attempts = max(row.attempts - 1, 0)
        return len(in_flight)

    def submit_control(self, command: str, args: str = "{}", at: float = 0.0) -> int:
        """A command line's request (ControlRequests.submit)."""
        request_id = next(self._control_ids)
        self.control[request_id] = _Control(request_id, command, args, at)
        return request_id

    # -- reading it back ------------------------------------------------------------

    def row(self, message_id: int) -> Row | None:
        """The message's row, or None if it is gone (acked, aborted, purged)."""
        return self.messages.get(message_id)

    def state_of(self, message_id: int) -> str:
        """Where the message is: "pending", "in flight", "dead", or "gone"."""
        row = self.messages.get(message_id)
        if row is None:
            return "gone"
        return {PENDING: "pending", IN_FLIGHT: "in flight", DEAD: "dead"}[row.state]

    @property
    def marks(self) -> MemoryStartMarks:
        """The start marks (a store made with ``starts=True``)."""
        assert self._starts is not None
        return self._starts

    def summary(self) -> dict[int, tuple[str, int]]:
        """Every message: {id: (where it is, attempts counted)}."""
        return {i: (self.state_of(i), r.attempts) for i, r in sorted(self.messages.items())}

    def queue_of(self, session_id: str) -> list[Row]:
        """The session's queued messages (pending or in flight, not delayed), by seq."""
        return sorted(
            (r for r in self.messages.values() if r.session_id == session_id and r.queued),
            key=lambda r: r.seq or 0,
        )

    def count(self, *states: MessageState) -> int:
        """Messages in any of ``states``."""
        return sum(1 for r in self.messages.values() if r.state in states)

    @property
    def waiting(self) -> list[str]:
        """The operations called and not committed, in commit order (held ones included)."""
        return [op.name for op in self._sealing] + [op.name for op in self._queue]

    # -- what it is -------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def max_value_bytes(self) -> int:
        return self._max_value_bytes

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def starts(self) -> StartMarks | None:
        return self._starts

    @property
    def may_have_state(self) -> bool:
        return bool(self.states)

    @property
    def cluster(self) -> None:
        return None  # (one process: every session is its own)

    @property
    def failed(self) -> trio.Event:
        return self._failed

    @property
    def failure(self) -> BaseException | None:
        return self._failure

    def use_clock(self, now: Callable[[], float]) -> None:
        self.clock_now = now

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            transactions=len(self.committed),
            operations=len(self.committed),
            largest_group=1 if self.committed else 0,
            queued_operations=len(self._queue) + len(self._sealing),
            checkpoints=0,
            bulk_checkpoints=0,
            wal_pages=0,
        )

    def check_file(self) -> None:
        pass  # no file to lose

    async def aclose(self) -> None:
        # Commit every queued operation: the holds still closed are released.
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        for op in [*self._sealing, *self._queue]:
            if op.hold is not None and not op.hold.released:
                op.hold.release()
        self._closed = True
        await trio.lowlevel.checkpoint()

    # -- the queue -----------------------------------------------------------------

    def _take_hold(self, name: str) -> Held | None:
        holds = self._holds.get(name)
        if not holds:
            return None
        held = holds.popleft()
        if not holds:
            del self._holds[name]
        return held

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StoreError(f"the database failed earlier: {self._failure}") from self._failure
        if self._closed:
            raise StoreError("the store is closed")

    def _submit(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        done: Callable[[Any], None] | None = None,
    ) -> _Op:
        self._check_usable()
        op = _Op(name, fn, args, done)
        held = self._take_hold(name)
        if held is not None:
            op.hold = held
            held._op = op
        self._queue.append(op)
        self._run()
        return op

    def _run(self) -> None:
        """Commit queued operations in order, up to the first one held."""
        if self._running:
            return  # (a completion called the store: the loop below goes on)
        self._running = True
        try:
            while self._queue:
                op = self._queue[0]
                if op.hold is not None and not op.hold.released:
                    op.hold._reached.set()
                    return
                self._queue.popleft()
                self._commit(op)
        finally:
            self._running = False

    def _commit(self, op: _Op) -> None:
        """Run one operation as one transaction, then report its outcome."""
        op.finished = True
        reason = op.hold.error if op.hold is not None else None
        if reason is not None:
            op.error = StoreError(f"{op.name} failed: {reason}")
        else:
            try:
                op.result = op.fn(*op.args)
            except Exception as exc:  # (a bug, here or in the caller's arguments)
                op.error = exc
        if op.error is None:
            self.committed.append(op.name)
            if op.done is not None:
                try:
                    op.done(op.result)
                except Exception as exc:  # as the committer: the store fails
                    op.error = StoreError(f"the completion of {op.name} failed: {exc!r}")
                    op.error.__cause__ = exc
        if op.error is not None and self._failure is None:
            self._failure = op.error
            self._failed.set()
        if op.task is not None:
            task, op.task = op.task, None
            trio.lowlevel.reschedule(task)

    def _released(self, held: Held) -> None:
        op = held._op
        if op is not None and op in self._sealing:
            self._sealing.remove(op)
            self._seal(op)
            self._queue.append(op)
        self._run()

    def _seal(self, op: _Op) -> None:
        seal, op.seal = op.seal, None
        assert seal is not None
        try:
            op.args = seal()
        except Exception as exc:
            op.fn, op.args = _raise, (exc,)

    async def _wait(self, op: _Op) -> Any:
        if op.finished:
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            op.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(_abort_failed)
        if op.error is not None:
            if isinstance(op.error, StoreError):
                raise op.error
            raise StoreError(f"database operation failed: {op.error}") from op.error
        return op.result

    async def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._wait(self._submit(name, fn, args))

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- sends ---------------------------------------------------------------------

    async def append(
        self,
        seal: Callable[[], AppendBatch],
        *,
        committed: Callable[[Appended], None] | None = None,
    ) -> Appended:
        self._check_usable()
        op = _Op("append", self._append, (), committed)
        op.seal = seal
        held = self._take_hold("append")
        op.hold = held
        if held is not None:
            held._op = op
        if held is None or held.after_seal or held.released:
            self._seal(op)  # (the committer takes the group now)
            self._queue.append(op)
            self._run()
        else:
            self._sealing.append(op)  # sealed when released; others pass it
            held._reached.set()
        result: Appended = await self._wait(op)
        return result

    def _append(
        self,
        sessions: list[str],
        bodies: list[str | bytes],
        enqueued: list[float],
        not_before: list[float | None] | None,
        claimed: set[int],
        keys: list[str | None] | None,
        key_retention: float,
        asked: object = None,
    ) -> Appended:
        first = self._next_seq
        self._next_seq += len(sessions)
        duplicates: dict[int, int] | None = None
        if keys is not None:
            duplicates = {}  # (keyed: never claimed on delivery; row by row)
        elif claimed:
            # Not one that would overtake a message of its session that waits.
            waiting = {
                r.session_id for r in self.messages.values() if r.queued and r.state is PENDING
            }
            claimed.difference_update([i for i in claimed if sessions[i] in waiting])
        for i, session_id in enumerate(sessions):
            msg_id = first + i
            key = keys[i] if keys is not None else None
            if key is not None and duplicates is not None:
                found = self.keys.get((session_id, key))
                if found is not None and (
                    found[1] is None or found[1] >= enqueued[i] - key_retention
                ):
                    duplicates[i] = found[0]
                    continue
                self.keys[(session_id, key)] = (msg_id, None)
            delay = not_before[i] if not_before is not None else None
            taken = not_before is None and keys is None and i in claimed
            self.messages[msg_id] = Row(
                id=msg_id,
                session_id=session_id,
                seq=None if delay is not None else msg_id,
                state=IN_FLIGHT if taken else PENDING,
                attempts=1 if taken else 0,
                body=bodies[i],
                enqueued_at=enqueued[i],
                not_before=delay,
                key=key,
            )
        return first, duplicates

    # -- claims and acknowledgements ---------------------------------------------------

    async def claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool = False,
        bulk: int = 0,
    ) -> Claim:
        result: Claim = await self._call(
            "claim_next",
            self._claim_next,
            session_id,
            ack,
            now,
            max_attempts,
            alone,
            want_state,
            bulk,
        )
        return result

    def _claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool,
        bulk: int,
    ) -> Claim:
        sent = self._ack(ack) if ack is not None else None
        claim = self._claim_head(session_id, now, max_attempts, alone, bulk)
        claim.sent = sent
        if want_state:
            claim.state = self.states.get(session_id)
        return claim

    def _claim_head(
        self, session_id: str, now: float, max_attempts: int, alone: bool, bulk: int
    ) -> Claim:
        dead: list[int] = []
        while True:
            queue = self.queue_of(session_id)
            if not queue:
                return Claim(None, 0, None, tuple(dead))
            head = queue[0]
            assert head.seq is not None
            if head.not_before is not None and head.not_before > now:
                return Claim(None, head.seq, head.not_before, tuple(dead))
            if head.attempts >= max_attempts:
                self._dead(head, _gave_up(head))
                dead.append(head.id)
                continue
            if head.crashed and head.attempts == max_attempts - 1 and not alone:
                return Claim(None, head.seq, None, tuple(dead), alone=True)
            try:
                body = decode_body(head.body)
            except ValueError as exc:
                self._dead(head, f"cannot decode message body: {exc}")
                dead.append(head.id)
                continue
            head.state, head.attempts = IN_FLIGHT, head.attempts + 1
            head.not_before, head.crashed, head.alone = None, False, alone
            message = Message(
                id=head.id,
                session_id=session_id,
                body=body,
                attempt=head.attempts,
                enqueued_at=head.enqueued_at,
                key=head.key,
            )
            claim = Claim(message, head.seq, None, tuple(dead))
            if len(queue) > 1:
                claim.more = True
                if bulk > 0:
                    self._claim_following(claim, queue[1 : bulk + 2], bulk)
            return claim

    def _claim_following(self, claim: Claim, rows: list[Row], limit: int) -> None:
        """Claim the first deliveries right behind the head (see sqlite_claim.claim_following)."""
        claim.more = len(rows) > limit
        for row in rows[:limit]:
            if row.state is not PENDING or row.attempts or row.crashed:
                claim.more = True
                break
            try:
                body = decode_body(row.body)
            except ValueError:
                claim.more = True
                break
            assert row.seq is not None
            claim.seq = row.seq
            claim.extra.append(
                new_message(row.id, row.session_id, body, 1, row.enqueued_at, row.key)
            )
        for msg in claim.extra:
            row = self.messages[msg.id]
            row.state, row.attempts = IN_FLIGHT, 1

    def _dead(self, row: Row, reason: str) -> None:
        row.state, row.not_before, row.last_error = DEAD, None, reason

    async def load_state(self, session_id: str) -> str | None:
        result: str | None = await self._call("load_state", self.states.get, session_id)
        return result

    async def ack(self, ack: int | Ack) -> Sent | None:
        result: Sent | None = await self._call("ack", self._ack, ack)
        return result

    def _ack(self, ack: int | Ack) -> Sent | None:
        if isinstance(ack, int):
            self.messages.pop(ack, None)
            return None
        done = [*ack.earlier, ack] if isinstance(ack, BatchAck) else [ack]
        for m in done:
            self.messages.pop(m.id, None)
            if m.key is not None:
                found = self.keys.get((ack.session_id, m.key))
                if found is not None and found[0] == m.id:
                    self.keys[(ack.session_id, m.key)] = (m.id, ack.at)
        if ack.state is not None:
            self.states[ack.session_id] = ack.state
        if not ack.outbox:
            return None
        sent: Sent = []
        for session_id, body, enqueued_at in ack.outbox:
            seq = self._take_seq()
            self.messages[seq] = Row(seq, session_id, seq, PENDING, 0, body, enqueued_at)
            sent.append((session_id, seq))
        return sent

    def ack_soon(self, ack: int | Ack, done: Callable[[tuple[int, Sent | None]], None]) -> None:
        self._check_usable()
        box = self._ack_box
        if box is not None and not box.sealed:
            box.acks.append(ack)
            return
        box = self._ack_box = _AckBox(ack)
        self._submit("ack_soon", self._ack_box_op, (box,), done)

    def _ack_box_op(self, box: _AckBox) -> tuple[int, Sent | None]:
        box.sealed = True
        sent: Sent | None = None
        count = 0
        for ack in box.acks:
            count += ack.count if isinstance(ack, BatchAck) else 1
            more = self._ack(ack)
            if more:
                sent = (sent or []) + more
        return count, sent

    async def fail(
        self, message_id: int, error: str, retry_at: float, max_attempts: int
    ) -> FailOutcome:
        result: FailOutcome = await self._call(
            "fail", self._fail, message_id, error, retry_at, max_attempts
        )
        return result

    def _fail(self, message_id: int, error: str, retry_at: float, max_attempts: int) -> FailOutcome:
        row = self.messages.get(message_id)
        if row is None:
            return "gone"
        row.last_error, row.alone = error, False
        if row.attempts >= max_attempts:
            row.state, row.not_before = DEAD, None
            return "dead"
        row.state, row.not_before = PENDING, retry_at
        return "retry"

    async def release(self, message_id: int, uncount: bool, crashed: bool) -> None:
        await self._call("release", self._release, message_id, uncount, crashed)

    def _release(self, message_id: int, uncount: bool, crashed: bool) -> None:
        row = self.messages.get(message_id)
        if row is not None and row.state is IN_FLIGHT:
            row.state = PENDING
            row.attempts = max(row.attempts - (1 if uncount else 0), 0)
            row.crashed = crashed

    async def release_many(self, message_ids: list[int]) -> None:
        await self._call("release_many", self._release_many, message_ids)

    def _release_many(self, message_ids: list[int]) -> None:
        for message_id in message_ids:
            row = self.messages.get(message_id)
            if row is not None and row.state is IN_FLIGHT:
                row.state, row.attempts = PENDING, max(row.attempts - 1, 0)

    def release_many_soon(self, message_ids: list[int]) -> None:
        self._submit("release_many_soon", self._release_many, (message_ids,), _ignore)

    async def defer_head(self, session_id: str, until: float) -> bool:
        result: bool = await self._call("defer_head", self._defer_head, session_id, until)
        return result

    def _defer_head(self, session_id: str, until: float) -> bool:
        queue = self.queue_of(session_id)
        if not queue:
            return False
        head = queue[0]
        head.not_before = max(head.not_before or 0.0, until)
        return True

    def after_commits(self, done: Callable[[], None]) -> None:
        self._submit("after_commits", _nothing, (), lambda _: done())

    # -- the timer and the waiting line ------------------------------------------------

    async def next_due(self, after: float) -> float | None:
        result: float | None = await self._call("next_due", self._next_due, after)
        return result

    def _next_due(self, after: float) -> float | None:
        rows = self.messages.values()
        delayed = [
            r.not_before
            for r in rows
            if r.not_before is not None and r.seq is None and r.state is PENDING
        ]
        retry = [r.not_before for r in rows if r.not_before is not None and r.not_before > after]
        values = delayed + retry
        return min(values) if values else None

    async def collect_due(self, after: float, now: float, limit: int) -> DueWork:
        result: DueWork = await self._call("collect_due", self._collect_due, after, now, limit)
        return result

    def _collect_due(self, after: float, now: float, limit: int) -> DueWork:
        due = sorted(
            (
                r
                for r in self.messages.values()
                if r.not_before is not None
                and r.not_before <= now
                and r.seq is None
                and r.state is PENDING
            ),
            key=lambda r: (r.not_before, r.id),
        )
        promoted: Sent = []
        for row in due[:limit]:
            row.seq, row.not_before = self._take_seq(), None
            promoted.append((row.session_id, row.seq))
        sessions: list[str] = []
        for row in sorted(self.messages.values(), key=lambda r: r.id):
            if (
                row.not_before is not None
                and after < row.not_before <= now
                and row.seq is not None
                and row.state is PENDING
                and row.session_id not in sessions
            ):
                sessions.append(row.session_id)
        return DueWork(promoted=promoted, retry_sessions=sessions, more=len(due) > limit)

    async def sessions_with_work(
        self, limit: int, exclude: frozenset[str]
    ) -> list[tuple[str, int]]:
        result: list[tuple[str, int]] = await self._call(
            "sessions_with_work", self._sessions_with_work, limit, exclude
        )
        return result

    def _sessions_with_work(self, limit: int, exclude: frozenset[str]) -> list[tuple[str, int]]:
        heads: dict[str, int] = {}
        for row in self.messages.values():
            if row.queued and row.seq is not None:
                heads[row.session_id] = min(heads.get(row.session_id, row.seq), row.seq)
        found = sorted(heads.items(), key=lambda item: item[1])
        return [(s, head) for s, head in found if s not in exclude][:limit]

    async def oldest_due(self, now: float) -> float | None:
        result: float | None = await self._call("oldest_due", self._oldest_due, now)
        return result

    def _oldest_due(self, now: float) -> float | None:
        times = [
            r.enqueued_at
            for r in self.messages.values()
            if r.queued and (r.not_before is None or r.not_before <= now)
        ]
        return min(times) if times else None

    # -- operators' changes ---------------------------------------------------------

    async def retry_dead(self, message_id: int | None) -> Sent:
        result: Sent = await self._call("retry_dead", self._retry_dead, message_id)
        return result

    def _retry_dead(self, message_id: int | None) -> Sent:
        requeued: Sent = []
        for row in sorted(self.messages.values(), key=lambda r: r.id):
            if row.state is DEAD and message_id in (None, row.id):
                row.state, row.attempts, row.seq = PENDING, 0, self._take_seq()
                row.not_before, row.last_error, row.crashed, row.alone = None, None, False, False
                requeued.append((row.session_id, row.seq))
        return requeued

    async def abort(self, message_id: int, unstarted: bool = False) -> Aborted | None:
        result: Aborted | None = await self._call("abort", self._abort, message_id, unstarted)
        return result

    def _abort(self, message_id: int, unstarted: bool) -> Aborted | None:
        row = self.messages.get(message_id)
        if row is None:
            return None
        state = row.state
        if unstarted and state is IN_FLIGHT:
            state = PENDING
        if state is not IN_FLIGHT:
            self._delete(row)
        return Aborted(state=state, session_id=row.session_id)

    def _delete(self, row: Row) -> None:
        del self.messages[row.id]
        if row.key is not None and self.keys.get((row.session_id, row.key), (0,))[0] == row.id:
            del self.keys[(row.session_id, row.key)]

    async def purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Purged:
        result: Purged = await self._call(
            "purge", self._purge, session_id, dead_only, before, limit
        )
        return result

    def _purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Purged:
        rows = [
            r
            for r in sorted(self.messages.values(), key=lambda r: r.id)
            if (r.state is DEAD if dead_only else r.state is not IN_FLIGHT)
            and session_id in (None, r.session_id)
            and (before is None or r.enqueued_at < before)
        ][:limit]
        for row in rows:
            self._delete(row)
        dead = sum(1 for r in rows if r.state is DEAD)
        return Purged(pending=len(rows) - dead, dead=dead, ids=[r.id for r in rows])

    async def sweep_keys(self, before: float, limit: int) -> int:
        result: int = await self._call("sweep_keys", self._sweep_keys, before, limit)
        return result

    def _sweep_keys(self, before: float, limit: int) -> int:
        stale = [k for k, (_, done) in self.keys.items() if done is not None and done < before]
        stale = stale[:limit]
        for k in stale:
            del self.keys[k]
        return len(stale)

    def dead_letters(self, session_id: str | None, limit: int | None) -> list[DeadLetter]:
        rows = [
            r
            for r in sorted(self.messages.values(), key=lambda r: r.id)
            if r.state is DEAD and session_id in (None, r.session_id)
        ]
        out = []
        for row in rows[:limit]:
            try:
                body = decode_body(row.body)
            except ValueError:
                body = row.body
            out.append(
                DeadLetter(
                    id=row.id,
                    session_id=row.session_id,
                    body=body,
                    attempts=row.attempts,
                    last_error=row.last_error or "",
                    enqueued_at=row.enqueued_at,
                )
            )
        return out

    # -- heartbeat and control table --------------------------------------------------

    async def heartbeat(self, value: str) -> None:
        await self._call("heartbeat", self._heartbeat, value)

    def _heartbeat(self, value: str) -> None:
        self.heartbeat_value = value

    def heartbeat_soon(self, value: str) -> None:
        self._submit("heartbeat_soon", self._heartbeat, (value,), _ignore)

    def has_open_requests(self) -> bool:
        return any(c.done_at is None for c in self.control.values())

    async def take_control(self, limit: int) -> list[ControlRequest]:
        result: list[ControlRequest] = await self._call("take_control", self._take_control, limit)
        return result

    def _take_control(self, limit: int) -> list[ControlRequest]:
        open_ = [c for c in sorted(self.control.values(), key=lambda c: c.id) if c.done_at is None]
        taken = []
        for c in open_[:limit]:
            c.result = '{"status": "applying"}'
            taken.append(ControlRequest(id=c.id, command=c.command, args=c.args))
        return taken

    async def finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None:
        await self._call(
            "finish_control", self._finish_control, request_id, done_at, result, forget_before
        )

    def _finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None:
        request = self.control.get(request_id)
        if request is not None:
            request.done_at, request.result = done_at, result
        for c in list(self.control.values()):
            if c.done_at is not None and c.done_at < forget_before:
                del self.control[c.id]


def _raise(exc: BaseException) -> None:
    raise exc


def _ignore(_result: object) -> None:
    pass


def _nothing() -> None:
    pass


if TYPE_CHECKING:

    def _implements_the_protocol(store: MemoryStore) -> Store:
        return store  # mypy checks that MemoryStore is a Store

    def _marks_implement_the_protocol(marks: MemoryStartMarks) -> StartMarks:
        return marks
