"""A session actor's state and the synchronous calls others make on it.

:class:`ActorState` holds where the actor is (its :class:`Phase`, changed
only by ``_to``, which checks :data:`TRANSITIONS`), what it holds (the
message in flight, the messages handed to it), and what it knows (the
seqs claimed and announced). The router, the supervisor and the watchdogs
call its methods: notices, wake-ups, kills, timeouts and claim on delivery.
Its task, the awaits, is :class:`~actors._actor.SessionActor`, a subclass.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import attrs
import trio

from ._failure import FailureText
from ._host import ActorHost
from ._phases import SERVING, TRANSITIONS, Cancel, Phase, TransitionError
from ._records import Message
from ._wake import WOKEN

# Read on the path of every handoff, as a module global: Python 3.11 reads
# an enum member through EnumType's hook, a call per read.
_NEW = Phase.NEW


@attrs.frozen
class SessionActorStatistics:
    """One session actor right now."""

    session_id: str
    phase: str  # Phase.value
    in_flight: int | None  # the id of the message it holds
    handler_running: bool
    idle: bool
    caught_up: bool
    claimed_seq: int
    notified_seq: int
    handed: int  # messages claimed on delivery, queued behind the one in flight
    turn: int  # messages processed in this activation
    parked: bool  # waiting for work (its task parked until someone brings it)


class ActorState:
    """A session's slot in the registry: its phase, what it holds, and the calls others make.

    The router, the supervisor and the watchdogs call these methods; each is
    synchronous and never blocks (it changes a field, reschedules the
    parked task, or cancels the incarnation's scope). The task that acts on
    them is :class:`~actors._actor.SessionActor`'s, a subclass.
    """

    # Slots: an actor has more fields than CPython 3.11 shares the keys of
    # (30), and past that every instance gets a dict of its own, read by
    # hashing on every access, and 1.3 kB larger.
    __slots__ = (
        "_batch",
        "_cancel",
        "_cut_instance",
        "_failure",
        "_failure_text",
        "_handoff_waiter",
        "_host",
        "_in_flight",
        "_parked",
        "_reserve_gen",
        "_reserved_new",
        "_scope",
        "_serve_gen",
        "_wait_scope",
        "carrier",
        "caught_up",
        "claimed_seq",
        "dropped",
        "evicted",
        "fresh_context",
        "fresh_handoff",
        "handed",
        "handler_deadline",
        "handler_started",
        "idle_deadline",
        "launch",
        "notified_seq",
        "phase",
        "pokes",
        "pokes_seen",
        "reserved",
        "session_id",
        "slot",
        "turn",
        "wait_until",
    )

    def __init__(self, session_id: str, host: ActorHost[Any]) -> None:
        self.session_id = session_id
        self._host = host
        self.phase = Phase.NEW  # changed only by _to()
        # The claimed message a handler is (about to be) running, until its
        # ack commits. Set and cleared only right after a store call returns,
        # so it agrees with the database: whatever ends the incarnation, this
        # is the message to fail or release. (The host's busy count follows it.)
        self._in_flight: Message | None = None
        # The batch a batched handler runs (in order), when in_flight heads
        # one of two or more: held, failed or given back with it. (Stale
        # when in_flight is another message: see SessionActor._held_batch.)
        self._batch: list[Message] | None = None
        # Whether in_flight's attempt is spent: its handler started (a kill
        # before that gives the attempt back).
        self.handler_started = False
        # The live incarnation's cancel scope (None between incarnations):
        # kill() and time_out() cancel it, and only it; _cancel says which.
        self._scope: trio.CancelScope | None = None
        self._cancel: Cancel | None = None
        self._failure: BaseException | None = None
        # The failure and its text, when the text was made where it was
        # caught (a failing started() logs it); else _after_crash makes it.
        self._failure_text: tuple[BaseException, FailureText] | None = None
        # Cancelled to cut a backoff or due wait short (stop, a waiter, a wake-up).
        self._wait_scope: trio.CancelScope | None = None
        # The task while it waits for work (parked: no scope, no channel);
        # unpark() reschedules it; the IdleWatch does at idle_deadline.
        self._parked: trio.lowlevel.Task | None = None
        self.idle_deadline = math.inf
        self.claimed_seq = 0  # highest seq claimed: notices at or below it are stale
        self.notified_seq = 0  # highest seq the router announced
        # Notices without a seq (work another process committed: its seqs
        # are not in this process's order), counted; pokes_seen is the count
        # the last claim started after. Invariant: pokes > pokes_seen means
        # a claim must run before the actor waits or leaves.
        self.pokes = 0
        self.pokes_seen = 0
        # Whether every message of the session in the database up to
        # claimed_seq is known to be handled: false until a claim found no
        # head in this incarnation (a new incarnation knows nothing).
        self.caught_up = False
        self._init_handoff()
        # This actor's slot in the start table (see _starts.py).
        starts = host.store.starts
        self.slot = starts.acquire() if starts is not None else -1
        # handler_timeout (see Watchdog): set before each handler call.
        self.handler_deadline = math.inf
        self.turn = 0  # messages processed since this activation (fair share)
        self.wait_until: float | None = None  # epoch time the head waits for (Exit.WAIT)
        # The session is no longer this process's (a clustered store handed
        # its bucket over, or lost it): no handler starts, the actor leaves.
        self.dropped = False
        self._init_task()

    def _init_task(self) -> None:
        """The fields of the task it runs in, which may serve other sessions
        before and after it (part of __init__; see SessionActor.run)."""
        # Retired while parked, its slot and task given to another session
        # (Supervisor.evict): the task unwinds it and runs that one.
        self.evicted = False
        # An actor started for a handoff: its task runs it once the messages
        # are handed (Supervisor._launch), the evicted ``carrier``'s if any.
        self.launch = False
        self.carrier: ActorState | None = None
        # Its task served another session in this step: switch to a fresh
        # context before any code of this session runs (see SessionActor.run).
        self.fresh_context = False
        # The instance and context of an incarnation a kill or a time-out
        # cut, until _after_cut settles it (outside the spent scope).
        self._cut_instance: tuple[Any, Any] | None = None

    def _init_handoff(self) -> None:
        """The fields of claim on delivery (part of __init__)."""
        # Claim on delivery: reserved while the router commits messages
        # inserted claimed for this actor; handed once committed, in seq
        # order, until the actor takes each in turn. While either is set the
        # actor does not leave the registry. Invariant: handed messages are
        # in flight in the database and come after every message of the
        # session this actor has not handled yet; whatever ends an
        # incarnation gives them back (_release_handed) before any claim.
        self.reserved = False
        self.handed: deque[Message] = deque()
        # The task while it waits for its reservation to settle
        # (_wait_handoff); take_handoff() reschedules it, as unpark() does.
        self._handoff_waiter: trio.lowlevel.Task | None = None
        # Handed before the first incarnation, inserted claimed with nothing
        # of the session pending (Store.append's check): nothing in the
        # database comes before or between them, so the actor starts caught
        # up, and needs no claim to learn it.
        self.fresh_handoff = False
        self._reserved_new = False  # reserved before its task ran: nothing claimed since
        # Serving periods (one per _serve call) and the one a reservation was
        # made in. A handoff is taken only in the period it was reserved in:
        # the store judged "nothing of the session pending" at insert time,
        # and a crash since (the message in flight failed back to pending)
        # may have made that false.
        self._serve_gen = 0
        self._reserve_gen = -1

    def _to(self, phase: Phase) -> None:
        """Change phase: the one place that does, and it asserts the change is legal."""
        if phase not in TRANSITIONS[self.phase]:
            raise TransitionError(self.session_id, self.phase, phase)
        self.phase = phase

    def statistics(self) -> SessionActorStatistics:
        """A snapshot of this actor."""
        return SessionActorStatistics(
            session_id=self.session_id,
            phase=self.phase.value,
            in_flight=self._in_flight.id if self._in_flight is not None else None,
            handler_running=self.handler_running,
            idle=self.idle,
            caught_up=self.caught_up,
            claimed_seq=self.claimed_seq,
            notified_seq=self.notified_seq,
            handed=len(self.handed),
            turn=self.turn,
            parked=self._parked is not None,
        )

    @property
    def in_flight(self) -> Message | None:
        """The claimed message this actor holds, if any."""
        return self._in_flight

    @in_flight.setter
    def in_flight(self, msg: Message | None) -> None:
        if (msg is None) != (self._in_flight is None):
            self._host.busy.add(1 if msg is not None else -1)
        self._in_flight = msg

    @property
    def handler_running(self) -> bool:
        """The handler runs now (the Watchdog times it)."""
        return self.phase is Phase.RUNNING

    # -- called by router / supervisor (sync, trio thread) ---------------

    def notify(self, seq: int) -> None:
        """Work up to ``seq`` is committed. Never blocks.

        A busy actor will claim again when its handler returns, so only a
        parked actor is woken, and only for work beyond what it claimed;
        ``notified_seq`` keeps the highest seq either way.
        """
        if seq > self.notified_seq:
            self.notified_seq = seq
            if self._parked is not None and seq > self.claimed_seq:
                self.unpark()

    def poke(self) -> None:
        """Work of this session was committed elsewhere: claim again before waiting."""
        self.pokes += 1
        self.wake()

    def wake(self) -> None:
        """Cut an idle, due or backoff wait short, so the actor looks again."""
        if self._parked is not None:
            self.unpark()
        elif self._wait_scope is not None:
            self._wait_scope.cancel()

    def _abort_park(self, _: object) -> trio.lowlevel.Abort:
        # The parked task is cancelled (a kill, or the system stopping hard).
        self._parked = None
        self._host.idle_actors.discard(self)
        return trio.lowlevel.Abort.SUCCEEDED

    @property
    def parked(self) -> bool:
        """Waiting for work."""
        return self._parked is not None

    @property
    def parked_task(self) -> trio.lowlevel.Task | None:
        """The task, while it waits for work."""
        return self._parked

    def unpark(self) -> None:
        """End the wait for work; the actor looks at what it has."""
        task = self._parked
        if task is not None:
            self._parked = None
            self._host.idle_actors.discard(self)
            trio.lowlevel.reschedule(task, WOKEN)

    @property
    def idle(self) -> bool:
        """Waiting for work (not running a handler, not between incarnations)."""
        return (self._parked is not None or self._wait_scope is not None) and (
            self.in_flight is None
        )

    def time_out(self) -> None:
        """The running handler passed its deadline (Watchdog): cancel it.

        It cancels the incarnation's scope, as kill() does; ``_cancel`` tells
        the two apart (_incarnation).
        """
        if self.phase is Phase.RUNNING and self._scope is not None and self._cancel is None:
            self._cancel = Cancel.TIMED_OUT
            self._scope.cancel()

    def kill(self) -> bool:
        """Crash the live incarnation now. Returns False if none is running."""
        if self._scope is None or self._cancel is Cancel.KILLED:
            return False
        self._cancel = Cancel.KILLED
        self._scope.cancel()
        return True

    def drop(self, *, cancel: bool) -> None:
        """The session is no longer this process's: leave, after the running
        handler returns, or at once with ``cancel`` (its writes would be refused)."""
        self.dropped = True
        if cancel:
            self.kill()
        self.wake()

    def has_new_work(self) -> bool:
        """True if work came beyond what was claimed: handed, reserved or announced."""
        return bool(
            self.reserved
            or self.handed
            or self.notified_seq > self.claimed_seq
            or self.pokes != self.pokes_seen
        )

    # -- claim on delivery (Supervisor.reserve / hand_over) ---------------

    def can_take_handoff(self) -> bool:
        """Serving: the router may insert this session's next messages claimed.

        Busy, idle or claiming alike: handed messages queue behind the one in
        flight (up to ``mailbox_size``). A claim under way was queued in the
        store before the insert, so it cannot see them; and the store inserts
        them claimed only if nothing of the session is pending, so they never
        overtake a message in the database (Store.append).
        """
        return (
            (self.phase in SERVING or self.phase is _NEW)
            and not self.reserved
            and len(self.handed) < self._host.config.mailbox_size
        )

    def reserve(self) -> None:
        """Claimed messages are on their way: do not leave before they come.

        (The idle wait may still time out meanwhile: the actor then finds
        itself reserved, and retire() refuses to let it go.)
        """
        self.reserved = True
        self._reserve_gen = self._serve_gen
        self._reserved_new = self.phase is _NEW

    def _abort_handoff_wait(self, _: object) -> trio.lowlevel.Abort:
        # The waiting task is cancelled (a kill, or the system stopping hard).
        self._handoff_waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def take_handoff(self, msgs: list[Message]) -> bool:
        """Receive the messages inserted claimed for this actor, and wake up.

        False if the actor stopped serving since the reservation (it crashed,
        or is leaving): the caller gives the claims back.
        """
        if not self.reserved:
            return False
        self.reserved = False
        waiter = self._handoff_waiter
        if waiter is not None:
            self._handoff_waiter = None
            trio.lowlevel.reschedule(waiter, WOKEN)
        if not msgs:
            return True  # none was inserted claimed after all
        if self.phase is _NEW:
            self.fresh_handoff = True  # (see _init_handoff)
        elif self.phase not in SERVING or self._reserve_gen != self._serve_gen:
            return False  # it stopped serving since: they may overtake a failed message
        elif self._reserved_new:
            # Started since, and waited for these (a reserved actor claims
            # nothing): as caught up as if they had come before it started.
            self.caught_up = True
        self.handed.extend(msgs)
        self.claimed_seq = max(self.claimed_seq, msgs[-1].id)
        if self._parked is not None:
            # Rescheduling a parked task is far cheaper than cancelling a
            # wait's scope (an exception, its unwinding, and trio's cancel
            # bookkeeping, once per message).
            self.unpark()
        return True
