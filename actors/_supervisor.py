"""The supervisor: which session actors are alive, and who gets a slot next.

It owns the nursery the session actors run in and the registry of live
actors. Actors start on demand (a session has no actor until it has work),
leave when idle, yield their slot after ``fair_share`` messages while other
sessions wait, and are restarted after a crash with the restart policy's
backoff. At most ``max_active`` actors are alive at once.

Sessions waiting for a slot form one line, first come first served: a
session that yields its slot goes to the back, behind every session that
waited before it yielded, so a slot comes to a waiting session after about
(sessions ahead of it + 1) x ``fair_share`` messages of others, however old
their backlogs. The front of the line is held in memory, up to a bound;
past it, and after a restart, waiting sessions are found in the database
instead ("overflow"), oldest head first (a session that has not run since
it got work began waiting when its head was sent), so memory grows with
active actors, not with pending work. Sessions that yield while the line
overflows wait in memory behind the overflow (``_behind``), up to a bound
too; beyond both bounds the order falls back to the age of the heads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ._actor import Actor, Exit, SessionActor
from ._clock import Clock
from ._config import Config
from ._errors import ActorKilledError, DeadLetteredError, HandlerTimeoutError, StoreError
from ._failure import FailureText, WarningLimiter, describe, rejected
from ._policy import RestartTracker
from ._records import Message
from ._reply import Reply
from ._streams import Events, Outputs, StatusEvent
from ._watchdog import IdleWatch, Watchdog
from .store import Store

if TYPE_CHECKING:
    from ._system import System
    from ._timer import Timer

log = logging.getLogger("actors.supervisor")

WAITING_LIMIT = 10_000  # sessions queued in memory; the rest are found in the database
BEHIND_LIMIT = 10_000  # sessions that yielded while the line overflowed, kept in memory

# Failures that are not the handler's own error: a kill (reported where it
# is asked for) and a handler timeout (the watchdog warns of it).
_NOT_A_HANDLER_ERROR = (ActorKilledError, HandlerTimeoutError)


def _kind(failure: BaseException) -> str:
    """What the WARNING rate limit tells failures apart by: the exception's type."""
    cls = type(failure)
    try:
        return f"{cls.__module__}.{cls.__qualname__}"
    except Exception:  # a metaclass with hostile names
        return "<unknown>"


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


@attrs.frozen
class SupervisorStatistics:
    """The registry and the waiting line right now, and restarts since start."""

    active: int  # live actors
    busy: int  # actors holding a claimed message
    idle: int  # actors waiting for work
    reserved: int  # actors waiting for a message claimed on delivery
    waiting: int  # sessions queued in memory for a slot
    overflow: bool  # more waiting sessions are in the database only
    isolating: str | None  # the session running a crash suspect alone
    restarts: int
    stopping: bool


class Supervisor:
    """Registry, activation, passivation, fairness and restarts of session actors."""

    def __init__(
        self,
        *,
        system: System,
        store: Store,
        clock: Clock,
        config: Config,
        factory: Callable[[], Actor],
        timer: Timer,
        pending: int,
        dead: int,
        rng: random.Random | None = None,
    ) -> None:
        self.system = system
        self.store = store
        self.clock = clock
        self.config = config
        self.factory = factory
        self.timer = timer
        self.rng = rng
        self.restarts = RestartTracker(config.restart_policy, rng)
        self.watchdog = Watchdog()
        self.idle_watch = IdleWatch()  # idle_timeout of actors waiting for work
        # {session_id: its live actor}; at most one per session, ever: an
        # actor is registered before its task starts and removed only by
        # retire()/forget() in the same step that ends it.
        self._actors: dict[str, SessionActor] = {}
        # len(_actors), for waiting until every actor has left (actors.testing).
        self.live = Gauge(0)
        # Sessions with work and no actor, waiting for a slot, in arrival
        # order. _waiting_set mirrors _waiting; neither holds a live session.
        self._waiting: deque[str] = deque()
        self._waiting_set: set[str] = set()
        # True when sessions with work may exist that are in neither
        # _actors nor _waiting: they are found in the database, oldest head
        # first. _overflow_gen counts the times it was set, so a refill
        # clears it only if nothing set it again while the refill read.
        self._overflow = pending > 0
        self._overflow_gen = 0
        # Sessions that yielded their slot while the line overflowed, in
        # yield order, with the store's next seq at that moment: they wait
        # behind every session of the database whose head is older (it
        # waited before they yielded), so a refill merges the two lines by
        # that order. Non-empty only while _overflow holds; _behind_set
        # mirrors it, and neither holds a live session or one in _waiting.
        self._behind: deque[tuple[int, str]] = deque()
        self._behind_set: set[str] = set()
        self._refill_wanted = trio.Event()
        self.idle_actors: set[SessionActor] = set()
        # {task: the session actor it runs}, while it runs (SessionActor.run):
        # what tells System.drain()/ask() they are called from a handler.
        self.actor_tasks: dict[trio.lowlevel.Task, SessionActor] = {}
        # Actors holding a claimed message (SessionActor.in_flight is set).
        self.busy = Gauge(0)
        # Actors reserved for a handoff whose message is not yet committed.
        self.reserved = Gauge(0)
        # The actor running a crash suspect alone, if any: while it is set,
        # no other actor claims, and it claims only once busy reaches 0.
        # The lock queues suspects (FIFO), one at a time.
        self.isolating: SessionActor | None = None
        self._isolation_lock = trio.Lock()
        self._isolation_over = trio.Event()
        self.stopping = False
        self._all_retired = trio.Event()
        # The stop's wait for running handlers (None outside it), and the
        # earliest end of it asked for (hasten() may come before stop()).
        self._grace: trio.CancelScope | None = None
        self._stop_deadline = math.inf
        self._nursery: trio.Nursery | None = None
        # Counts. outstanding = pending + in flight (drain waits for 0).
        self.outstanding = Gauge(pending)
        self.dead = dead
        self.processed = 0
        self.failed_attempts = 0
        # Which first failures of a message get a WARNING (on_attempt_failed).
        self._first_failures = WarningLimiter()
        self.dead_lettered = 0
        self.restart_count = 0
        self.outbox_sent = 0  # messages committed by ctx.send with their ack
        # {message id: the reply an ask() waits for}; an entry leaves when
        # it is answered, or when its asker stops waiting.
        self.replies: dict[int, Reply] = {}
        self.outputs = Outputs()  # System.subscribe
        # Called after each successful handler with (message, seconds the
        # handler ran); None (the default) costs one test per message.
        self.observer: Callable[[Message, float], None] | None = None
        self.events = Events()  # System.events

    # -- the supervisor task --------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the actors' nursery until stop() has finished with it."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._refill_loop)
                nursery.start_soon(self.idle_watch.run, name="actors.idle")
                if self.config.handler_timeout is not None:
                    nursery.start_soon(self.watchdog.run, name="actors.watchdog")
                self._want_refill()
                task_status.started()
                await trio.sleep_forever()
            # Only stop() ends the sleep and leaves quietly. A Cancelled that
            # escaped an actor's task (it cancels this nursery and is then
            # swallowed by it) would otherwise end the supervisor while the
            # system still accepts sends: fail the system instead.
            if not self.stopping:
                raise RuntimeError(
                    "the supervisor's nursery ended while the system was open "
                    "(a task of it raised a Cancelled it had caught elsewhere)"
                )
        finally:
            # The nursery is closed: late calls (the router or timer still
            # winding down) must not try to start actors in it.
            self.stopping = True
            self._nursery = None

    async def stop(self, deadline: float) -> None:
        """Stop gracefully: no new claims, running handlers may go on until ``deadline``.

        ``deadline`` is in trio time (hasten() may bring it closer). Then
        whatever still runs is cancelled; messages it held go back to
        pending, their attempt counted if their handler had started (a claim
        whose handler never started gives its attempt back).
        """
        self.begin_stop()
        if self._actors:
            with trio.CancelScope(deadline=min(deadline, self._stop_deadline)) as grace:
                self._grace = grace
                try:
                    await self._all_retired.wait()
                finally:
                    self._grace = None
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def begin_stop(self) -> None:
        """No handler starts from now on (synchronous: in the step that asks).

        Actors are woken to leave, the line for slots is dropped (those
        sessions' work stays in the database), and what is delivered later
        (the router's last batch) stays pending. Idempotent.
        """
        self.stopping = True
        self._waiting.clear()
        self._waiting_set.clear()
        self._behind.clear()
        self._behind_set.clear()
        for actor in list(self._actors.values()):
            actor.wake()

    def hasten(self, deadline: float) -> None:
        """Bring the end of the stop's grace to ``deadline`` if that is sooner."""
        self._stop_deadline = min(self._stop_deadline, deadline)
        if self._grace is not None:
            self._grace.deadline = min(self._grace.deadline, deadline)

    # -- what the router, the timer and the system call ---------------------

    def ensure(self, session_id: str, seq: int = 0) -> None:
        """Work for ``session_id`` is committed (up to ``seq``, if known): get it done."""
        actor = self._actors.get(session_id)
        if actor is not None:
            if seq:
                actor.notify(seq)
            else:
                actor.wake()
            return
        if self.stopping or session_id in self._waiting_set or session_id in self._behind_set:
            return
        if len(self._actors) < self.config.max_active and not self.has_waiters:
            self._start(session_id)
        else:
            self._queue(session_id)

    def kill(self, session_id: str) -> bool:
        """Crash ``session_id``'s actor now. False if it has none running."""
        actor = self._actors.get(session_id)
        return actor is not None and actor.kill()

    def statistics(self) -> SupervisorStatistics:
        """A snapshot of the registry and the waiting line."""
        return SupervisorStatistics(
            active=len(self._actors),
            busy=self.busy.value,
            idle=len(self.idle_actors),
            reserved=self.reserved.value,
            waiting=self.waiting,
            overflow=self._overflow,
            isolating=self.isolating.session_id if self.isolating is not None else None,
            restarts=self.restart_count,
            stopping=self.stopping,
        )

    @property
    def has_waiters(self) -> bool:
        """Whether some session with work waits for a slot."""
        return bool(self._waiting) or self._overflow

    @property
    def active(self) -> int:
        """Live session actors (running, idle, or between incarnations)."""
        return len(self._actors)

    @property
    def waiting(self) -> int:
        """Sessions queued in memory for a slot."""
        return len(self._waiting) + len(self._behind)

    def in_flight(self) -> int:
        """Messages a handler holds right now."""
        return int(self.busy.value)

    # -- running a crash suspect alone ------------------------------------

    async def isolate(self, actor: SessionActor) -> None:
        """Become the only actor with a message in flight (see Store.claim_next).

        Waits for any other isolation to end, stops every other actor from
        claiming, then waits until nothing else is in flight.
        """
        await self._isolation_lock.acquire()
        self.isolating = actor
        self._isolation_over = trio.Event()
        log.warning(
            "session %r: a message that was in flight when the process died runs alone",
            actor.session_id,
        )
        await self.reserved.wait_zero()
        await self.busy.wait_zero()

    def end_isolation(self, actor: SessionActor) -> None:
        """Let everyone claim again (no-op unless ``actor`` is isolating)."""
        if self.isolating is actor:
            self.isolating = None
            self._isolation_over.set()
            self._isolation_lock.release()

    async def wait_isolation(self, actor: SessionActor) -> None:
        """Hold ``actor``'s next claim while another actor runs alone."""
        while self.isolating is not None and self.isolating is not actor:
            await self._isolation_over.wait()

    def is_live(self, session_id: str) -> bool:
        """Whether ``session_id`` has an actor right now."""
        return session_id in self._actors

    def live_sessions(self) -> list[str]:
        """The sessions that have an actor right now, sorted."""
        return sorted(self._actors)

    def busy_sessions(self) -> list[str]:
        """The sessions whose actor holds a claimed message right now, sorted."""
        return sorted(s for s, actor in self._actors.items() if actor.in_flight is not None)

    # -- claim on delivery (see Router.run) ---------------------------------

    def reserve(self, sessions: list[str]) -> dict[SessionActor, list[int]]:
        """Pick the actors that will be handed their sessions' messages.

        Returns {actor: indices in ``sessions`` of the messages it gets, in
        order}. An actor qualifies when it serves (SessionActor.can_take_handoff:
        idle, busy or claiming, with room for them) and nothing runs alone;
        whether they are then inserted claimed is the store's decision (not
        while the session has pending messages: Store.append). Not
        one that used its fair share while others wait for a slot: it should
        finish and leave. A reserved actor does not leave until hand_over()
        (it counts in ``reserved``, which isolation waits for too).
        """
        if self.stopping or self.isolating is not None:
            return {}
        picked: dict[SessionActor, list[int]] = {}
        refused: set[str] = set()
        actors = self._actors
        room = self.config.mailbox_size
        fair_share = self.config.fair_share if self.has_waiters else None
        for index, session_id in enumerate(sessions):
            actor = actors.get(session_id)
            if actor is None:
                continue
            indices = picked.get(actor)
            if indices is None:
                if session_id in refused:
                    continue
                if not actor.can_take_handoff() or (
                    fair_share is not None and actor.turn >= fair_share
                ):
                    refused.add(session_id)
                    continue
                actor.reserve()
                picked[actor] = [index]
            elif len(indices) + len(actor.handed) < room:
                indices.append(index)
            # else full: this one and every later one of the session stay
            # pending; the router's notice makes the actor claim them, in
            # order, once its handed messages are done.
        if picked:
            self.reserved.add(len(picked))
        return picked

    def hand_over(self, actor: SessionActor, msgs: list[Message]) -> None:
        """Give a reserved actor the messages that were inserted claimed for it.

        ``msgs`` is empty when none was (the session had pending messages):
        that only ends the reservation.
        """
        self.reserved.add(-1)
        if self._actors.get(actor.session_id) is actor and actor.take_handoff(msgs):
            return
        if not msgs:
            return
        # The actor crashed, is leaving, or is gone: give the claims back.
        with contextlib.suppress(StoreError):
            self.store.release_many_soon([m.id for m in msgs])
        self.ensure(actor.session_id)

    def unhand(self, *, message_id: int | None = None, session_id: str | None = None) -> list[int]:
        """Take messages out of actors' handed queues; returns their ids.

        Claimed on delivery but not started, they are in flight in the
        database and no actor will run them now: ``abort`` and ``purge``
        may delete them. ``message_id``: that one, wherever it waits;
        ``session_id``: every one of that session.
        """
        if session_id is not None:
            actor = self._actors.get(session_id)
            actors = [actor] if actor is not None else []
        else:
            actors = [a for a in self._actors.values() if a.handed]
        taken: list[int] = []
        for actor in actors:
            take = {m.id for m in actor.handed if message_id is None or m.id == message_id}
            if take:
                kept = [m for m in actor.handed if m.id not in take]
                actor.handed.clear()
                actor.handed.extend(kept)
                taken.extend(sorted(take))
        return taken

    # -- what actors call -------------------------------------------------

    def retire(self, actor: SessionActor, outcome: Exit) -> bool:
        """Let ``actor`` leave after ``outcome``; False if it must go on working.

        Synchronous on purpose: between the last look at its notices and
        handed messages and the removal from the registry there is no
        checkpoint, so a notice either arrived before (the actor goes on) or
        finds no actor (a new one starts). No message is stranded by a
        passivation.
        """
        if outcome is not Exit.STOP and (actor.reserved or actor.handed):
            return False  # messages claimed on delivery are on their way or here
        if outcome is Exit.IDLE and not self.stopping and actor.has_new_work():
            return False
        assert self._actors.get(actor.session_id) is actor
        del self._actors[actor.session_id]
        self.watchdog.forget(actor)
        self.idle_watch.forget(actor)
        self._free_slot(actor)
        if outcome is Exit.WAIT and actor.wait_until is not None:
            self.timer.schedule(actor.wait_until, actor.session_id)
        elif outcome is Exit.YIELD and not self.stopping:
            self._queue(actor.session_id, yielded=True)
        log.debug("actor of %r left (%s)", actor.session_id, outcome.value)
        if self.events.active:
            self.emit("actor_stopped", actor.session_id, detail=outcome.value)
        self._after_leave()
        return True

    def forget(self, actor: SessionActor) -> None:
        """Remove an actor that was cancelled (stop, or the system failing)."""
        if self._actors.get(actor.session_id) is actor:
            del self._actors[actor.session_id]
            self.watchdog.forget(actor)
            self.idle_watch.forget(actor)
            self._free_slot(actor)
            if self.events.active:
                self.emit("actor_stopped", actor.session_id, detail="cancelled")
            self._after_leave()

    def _free_slot(self, actor: SessionActor) -> None:
        """Free the actor's start-table slot once its submitted acks have committed.

        (Until then its mark must stay: a crash would otherwise redeliver a
        handled message with its attempt given back. The store commits
        operations in order, so a no-op's commit comes after theirs.)
        """
        slot, actor.slot = actor.slot, -1
        starts = self.store.starts
        if slot < 0 or starts is None:
            return
        with contextlib.suppress(StoreError):
            self.store.after_commits(lambda: starts.release(slot))

    def emit(self, kind: str, session_id: str | None = None, **fields: object) -> None:
        """Publish a status event (cheap when nobody listens: check ``events.active`` first)."""
        self.events.emit(StatusEvent(kind, self.clock.now(), session_id, **fields))  # type: ignore[arg-type]

    def on_actor_started(self, actor: SessionActor) -> None:
        log.debug("actor of %r started", actor.session_id)
        if self.events.active:
            self.emit("actor_started", actor.session_id)

    def on_acked(self) -> None:
        self.processed += 1
        self.outstanding.add(-1)

    def on_acks_committed(self, result: tuple[int, list[tuple[str, int]] | None]) -> None:
        """A box of acks committed (Store.ack_soon)."""
        count, sent = result
        if sent:  # first: outstanding must not touch zero in between (drain)
            self.on_sent(sent)
        self.processed += count
        self.outstanding.add(-count)

    def on_sent(self, sent: list[tuple[str, int]]) -> None:
        """Messages of an outbox (ctx.send) committed with their ack: deliver them."""
        self.outbox_sent += len(sent)
        self.outstanding.add(len(sent))
        for session_id, seq in sent:
            self.ensure(session_id, seq)

    def on_dead_lettered(
        self, session_id: str, count: int, ids: tuple[int, ...] = (), reason: str = ""
    ) -> None:
        self.dead_lettered += count
        self.dead += count
        self.outstanding.add(-count)
        log.error(
            "%d message(s) of session %r moved to dead letters%s",
            count,
            session_id,
            f": {reason.splitlines()[0]}" if reason else "",
        )
        for msg_id in ids:
            reply = self.replies.pop(msg_id, None)
            if reply is not None:
                reply.set_error(DeadLetteredError(msg_id, reason or "its attempts ran out"))
            if self.events.active:
                self.emit("dead_lettered", session_id, message_id=msg_id, detail=reason)

    def answer(self, msg_id: int, result: object) -> None:
        """The handler of ``msg_id`` returned ``result``: answer its asker, if any."""
        reply = self.replies.pop(msg_id, None)
        if reply is not None:
            reply.set_result(result)

    def on_attempt_failed(
        self,
        session_id: str,
        msg: Message,
        failure: BaseException,
        dead: bool,
        text: FailureText | None = None,
    ) -> None:
        """Log a failed attempt, answer its asker, count it (and its dead letter).

        ``text`` is the failure made text once (``describe``): nothing here
        calls repr() or str() on the user's exception.
        """
        self.failed_attempts += 1
        if text is None:
            text = describe(failure)
        warned = False
        if (
            msg.attempt == 1
            and not issubclass(type(failure), _NOT_A_HANDLER_ERROR)
            and rejected(failure) is None
        ):
            # The first failure of a message, raised by the handler: a
            # broken handler must not be silent at the default log level.
            # Rate-limited (a handler that fails everything would flood).
            held = self._first_failures.allow(_kind(failure), trio.current_time())
            if held is not None:
                log.warning(
                    "attempt %d of message %d (session %r) failed%s:\n%s",
                    msg.attempt,
                    msg.id,
                    session_id,
                    f" ({held} more first failures held back since the last WARNING)"
                    if held
                    else "",
                    text.report,
                )
                warned = True
        if not warned:
            log.info(
                "attempt %d of message %d (session %r) failed: %s",
                msg.attempt,
                msg.id,
                session_id,
                text.summary,
            )
        if self.replies and not issubclass(type(failure), ActorKilledError):
            # The handler's own outcome (it raised, or timed out) answers an
            # asker; a kill does not: the message is tried again.
            reply = self.replies.pop(msg.id, None)
            if reply is not None:
                reply.set_error(failure)
        if dead:
            self.on_dead_lettered(session_id, 1, (msg.id,), text.summary)

    def on_restart(
        self, actor: SessionActor, failure: BaseException, summary: str | None = None
    ) -> tuple[float, bool]:
        """Count a crash; returns (seconds before the restart, whether suspended).

        ``summary`` is the failure's text (``describe``), made if not given.
        """
        self.restart_count += 1
        delay, suspended = self.restarts.record(actor.session_id, trio.current_time())
        if suspended:
            log.warning(
                "session %r restarted more than %d times in %ss; suspended for %.1fs",
                actor.session_id,
                self.config.restart_policy.max_restarts,
                self.config.restart_policy.window,
                delay,
            )
        elif delay > 0:
            log.info("restarting the actor of session %r in %.2fs", actor.session_id, delay)
        if self.events.active:
            if summary is None:
                summary = describe(failure).summary
            self.emit("actor_restarted", actor.session_id, detail=summary, delay=delay)
            if suspended:
                self.emit("session_suspended", actor.session_id, delay=delay)
        return delay, suspended

    # -- slots ------------------------------------------------------------

    def _start(self, session_id: str) -> None:
        assert session_id not in self._actors
        if self._nursery is None:
            return  # stopped; the work stays in the database for the next start
        try:
            actor = SessionActor(session_id, self)
            self._nursery.start_soon(actor.run, name=f"actor:{session_id}")
        except RuntimeError:
            # The nursery closed (the system is failing) before run()'s
            # finally could say so: the work stays in the database.
            self.stopping = True
            return
        self._actors[session_id] = actor
        self.live.add(1)

    def _queue(self, session_id: str, *, yielded: bool = False) -> None:
        """Put ``session_id`` at the back of the line for a slot.

        ``yielded``: it just left a slot after its fair share. Its head is
        old, so the database's age order would put it first again: it is
        kept in memory, at the back (the slot it freed takes a session off
        the line at once, so the line does not grow).
        """
        if yielded and not self._overflow:
            self._waiting.append(session_id)
            self._waiting_set.add(session_id)
        elif yielded and len(self._behind) < BEHIND_LIMIT:
            self._behind.append((self.store.next_seq, session_id))
            self._behind_set.add(session_id)
        elif self._overflow or len(self._waiting) >= WAITING_LIMIT:
            self._set_overflow()  # it is in the database; a refill finds it in age order
        else:
            self._waiting.append(session_id)
            self._waiting_set.add(session_id)
        if len(self._actors) >= self.config.max_active and self.idle_actors:
            # Free a slot: an idle actor leaves at once.
            self.idle_actors.pop().wake()

    def _set_overflow(self) -> None:
        self._overflow = True
        self._overflow_gen += 1
        if len(self._actors) < self.config.max_active:
            self._want_refill()

    def _after_leave(self) -> None:
        self.live.add(-1)
        self._fill()
        if self.stopping and not self._actors:
            self._all_retired.set()

    def _fill(self) -> None:
        """Start waiting sessions while there is room."""
        if self.stopping:
            return
        max_active = self.config.max_active
        while self._waiting and len(self._actors) < max_active:
            session_id = self._waiting.popleft()
            self._waiting_set.discard(session_id)
            if session_id not in self._actors:
                self._start(session_id)
        if self._overflow and len(self._actors) < max_active:
            self._want_refill()

    def _want_refill(self) -> None:
        self._refill_wanted.set()

    async def _refill_loop(self) -> None:
        while True:
            await self._refill_wanted.wait()
            self._refill_wanted = trio.Event()
            while (
                self._overflow
                and not self._waiting
                and not self.stopping
                and len(self._actors) < self.config.max_active
            ):
                generation = self._overflow_gen
                exclude = frozenset(self._actors) | self._behind_set
                found = await self.store.sessions_with_work(WAITING_LIMIT, exclude)
                if len(found) < WAITING_LIMIT and generation == self._overflow_gen:
                    self._overflow = False
                # Merge the sessions found (oldest head first) with those
                # that yielded meanwhile, by when each began to wait. While
                # more remain in the database, a yielded one comes only
                # before the last head found: the rest may be older.
                behind = self._behind
                for session_id, head in found:
                    while behind and behind[0][0] <= head:
                        self._line_up(behind.popleft()[1])
                    self._line_up(session_id)
                if not self._overflow:
                    while behind:
                        self._line_up(behind.popleft()[1])
                self._fill()

    def _line_up(self, session_id: str) -> None:
        """Append a session of the overflow to the line in memory (refill)."""
        self._behind_set.discard(session_id)
        if session_id not in self._actors and session_id not in self._waiting_set:
            self._waiting.append(session_id)
            self._waiting_set.add(session_id)
