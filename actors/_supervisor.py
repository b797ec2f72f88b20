"""The supervisor: which session actors are alive, and who gets a slot next.

It owns the nursery the session actors run in and the registry of live
actors. Actors start on demand (a session has no actor until it has work),
leave when idle, yield their slot after ``fair_share`` messages while other
sessions wait, and are restarted after a crash with the restart policy's
backoff. At most ``max_active`` actors are alive at once.

Sessions waiting for a slot wait in one line, fair across sessions
(``_line.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from . import _line, _remote
from ._actor import SessionActor
from ._clock import Clock
from ._config import Config
from ._errors import ActorKilledError, DeadLetteredError, HandlerTimeoutError, StoreError
from ._failure import FailureText, WarningLimiter, describe, rejected
from ._gauge import Gauge
from ._host import Behaviour
from ._isolation import Isolation
from ._line import WaitingLine
from ._phases import Exit
from ._policy import RestartTracker
from ._records import Message
from ._reply import Reply
from ._streams import Events, Outputs, StatusEvent
from ._timer import Timer
from ._watchdog import IdleWatch, Watchdog
from .store import DatabaseCounts, Store

if TYPE_CHECKING:
    from ._session import SessionData
    from .store import Cluster

log = logging.getLogger("actors.supervisor")


# Failures that are not the handler's own error: a kill (reported where it
# is asked for) and a handler timeout (the watchdog warns of it).
_NOT_A_HANDLER_ERROR = (ActorKilledError, HandlerTimeoutError)


# At most this many answers wait for their ask() to learn its message id.
_EARLY_REPLIES = 10_000


def _kind(failure: BaseException) -> str:
    """What the WARNING rate limit tells failures apart by: the exception's type."""
    cls = type(failure)
    try:
        return f"{cls.__module__}.{cls.__qualname__}"
    except Exception:  # a metaclass with hostile names
        return "<unknown>"


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
        store: Store,
        clock: Clock,
        config: Config,
        behaviour: Behaviour,
        new_context: Callable[[SessionData], object],
        pending: int,
        dead: int,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        # A store shared by several processes runs here only the sessions
        # it says this process owns (None: every session is ours).
        self.cluster = store.cluster
        self.clock = clock
        self.config = config
        self.behaviour = behaviour
        self.new_context = new_context  # the handler's view of a SessionData (a Context)
        self.timer = Timer(store, clock, self.ensure)
        self.rng = rng
        self.restarts = RestartTracker(config.restart_policy, rng)
        self.watchdog = Watchdog()
        # (Bound once: see ActorHost.)
        self.acks_committed: Callable[[tuple[int, list[tuple[str, int]] | None]], None] = (
            self.on_acks_committed
        )
        self.trio_time: Callable[[], float] = clock.trio_time
        self.idle_watch = IdleWatch()  # idle_timeout of actors waiting for work
        # {session_id: its live actor}; at most one per session, ever: added
        # before its task starts, removed only by retire()/forget().
        self._actors: dict[str, SessionActor] = {}
        # len(_actors), for waiting until every actor has left (actors.testing).
        self.live = Gauge(0)
        # Sessions with work and no actor, waiting for a slot; none is live.
        self.line = WaitingLine(overflow=pending > 0)
        self._refill_wanted = trio.Event()
        self.idle_actors: set[SessionActor] = set()
        self._init_tasks()
        # {task: the actor it runs}: tells drain()/ask() they are called from one.
        self.actor_tasks: dict[trio.lowlevel.Task, SessionActor] = {}
        self.busy = Gauge(0)  # actors holding a claimed message (in_flight set)
        self.reserved = Gauge(0)  # actors reserved for a handoff not yet committed
        self.isolation: Isolation[SessionActor] = Isolation(self.busy, self.reserved)
        self.stopping = False
        self._all_retired = trio.Event()
        # The stop's wait for running handlers (None outside it), and its
        # earliest end asked for (hasten() may come before stop()).
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
        self._init_streams()

    def _init_tasks(self) -> None:
        """What outlives an actor: its task, its start-table slot (part of __init__)."""
        # Sessions given to the task of an actor that left, to run next
        # (SessionActor.run), and the task retire() offers to _start().
        self._successors: dict[trio.lowlevel.Task, SessionActor] = {}
        self._free_task: trio.lowlevel.Task | None = None
        # Start-table slots of actors that left, until their acks commit
        # (_free_slot): waiting for the next no-op, and the ones it frees.
        self._leaving_slots: list[int] = []
        self._slots_releasing: list[int] | None = None
        # What each session's handler runs in: a fresh copy of this, the
        # context the system is opened in (run_system builds the supervisor).
        self._context = contextvars.copy_context()

    def _init_streams(self) -> None:
        """What answers asks and feeds subscribers (part of __init__)."""
        # {message id: the reply an ask() waits for}, until answered or given up.
        self.replies: dict[int, Reply] = {}
        # Claimed messages an ask() of another process waits for (a
        # clustered store's; empty otherwise): answered through the store.
        self.remote_asks: Mapping[int, str] = (
            self.cluster.remote_asks if self.cluster is not None else {}
        )
        # Outputs of sessions run elsewhere, for subscribers here, in order
        # (a clustered store's); relayed by a task, with backpressure here.
        self._arrived_send, self._arrived = trio.open_memory_channel[list[tuple[str, str]]](
            math.inf
        )
        # Answers from other processes that came before their ask() knew
        # its message id (a race of microseconds), by id.
        self.early_replies: dict[int, str] = {}
        self.outputs = Outputs()  # System.subscribe
        if self.cluster is not None:
            self._share_outputs(self.cluster)
        # Called after each handled message with (message, seconds it ran).
        self.observer: Callable[[Message, float], None] | None = None
        self.events = Events()  # System.events

    # -- the supervisor task --------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the actors' nursery until stop() has finished with it."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._refill_loop)
                if self.cluster is not None:
                    nursery.start_soon(self._relay_outputs)
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
        self.line.clear()
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
        if self.cluster is not None and not self.cluster.owns(session_id):
            return  # (its owner was told by the database)
        actor = self._actors.get(session_id)
        if actor is not None:
            if not seq:
                actor.wake()
            elif self.cluster is None:
                actor.notify(seq)
            else:
                # In a cluster, seqs are not in commit order: each process
                # (each committer) takes its ids in blocks of its own, so a
                # claim of another process's message can take the actor's
                # claimed_seq past this process's later seqs, and a notice
                # by seq would not wake it. A poke is counted, not compared.
                actor.poke()
            return
        if self.stopping or session_id in self.line:
            return
        if len(self._actors) < self.config.max_active and not self.line.has_waiters:
            self._start(session_id)
        else:
            self._queue(session_id)

    # -- a clustered store's news (ClusterHost) --------------------------------

    def work_found(
        self, sessions: list[tuple[str, float | None]], more: bool, delayed: bool
    ) -> None:
        """Work came to these sessions from elsewhere (another process, a takeover)."""
        actors = self._actors
        now = self.clock.now()
        if delayed:
            self.timer.schedule(now)  # (the timer looks at the deadlines again)
        for session_id, waits_until in sessions:
            if waits_until is not None and waits_until > now:
                self.timer.schedule(waits_until, session_id)  # (a retry wait, a suspension)
                continue
            actor = actors.get(session_id)
            if actor is not None:
                actor.poke()  # (its seqs are not in this process's order)
            else:
                self.ensure(session_id, 0)
        if more and not self.stopping:
            self.line.set_overflow()
            self._want_refill()

    def drop_sessions(self, which: Callable[[str], bool], hard: bool) -> None:
        """These sessions are no longer this process's: their actors leave."""
        for actor in list(self._actors.values()):
            if which(actor.session_id):
                actor.drop(cancel=hard)

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
            overflow=self.line.overflow,
            isolating=self.isolating.session_id if self.isolating is not None else None,
            restarts=self.restart_count,
            stopping=self.stopping,
        )

    @property
    def active(self) -> int:
        """Live session actors (running, idle, or between incarnations)."""
        return len(self._actors)

    @property
    def waiting(self) -> int:
        """Sessions queued in memory for a slot."""
        return len(self.line)

    def in_flight(self) -> int:
        """Messages a handler holds right now."""
        return int(self.busy.value)

    # -- running a crash suspect alone ------------------------------------

    @property
    def isolating(self) -> SessionActor | None:
        """The actor running a crash suspect alone, if any (see Isolation)."""
        return self.isolation.holder

    async def isolate(self, actor: SessionActor) -> None:
        """Become the only actor with a message in flight (see Isolation.enter)."""
        await self.isolation.enter(actor, actor.session_id)

    def end_isolation(self, actor: SessionActor) -> None:
        """Let everyone claim again (no-op unless ``actor`` is isolating)."""
        self.isolation.end(actor)

    async def wait_isolation(self, actor: SessionActor) -> None:
        """Hold ``actor``'s next claim while another actor runs alone."""
        await self.isolation.wait(actor)

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
        fair_share = self.config.fair_share if self.line.has_waiters else None
        batch: set[str] | None = None  # the batch's sessions (their idle actors stay)
        for index, session_id in enumerate(sessions):
            actor = actors.get(session_id)
            if actor is None:
                if session_id in refused:
                    continue
                if batch is None:
                    batch = set(sessions)
                actor = self._start_for_handoff(session_id, batch)
                if actor is None:
                    refused.add(session_id)
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

    def _start_for_handoff(self, session_id: str, batch: set[str]) -> SessionActor | None:
        """Start an actor now for a session of the batch being sealed, to be
        handed its messages: activation without a claim.

        Only where the session would start at once anyway (a free slot,
        nobody waiting for one), or in the slot of a parked actor that has
        nothing to do (evict). Not in a cluster: there a message of the
        session may be in flight for another process (the store's check at
        insert looks only for pending ones).
        """
        if self.cluster is not None or session_id in self.line or self.line.has_waiters:
            return None
        # Its task runs (or the evicted actor's task wakes) once the
        # messages are handed (hand_over): the actor then finds them there,
        # and waits for nothing.
        if len(self._actors) < self.config.max_active:
            return self._start(session_id, launch=False)
        idle = self._idle_to_evict(batch)
        if idle is None:
            return None
        self.evict(idle)
        return self._start(session_id, launch=False, carrier=idle)

    def _idle_to_evict(self, batch: set[str]) -> SessionActor | None:
        """A parked actor whose slot and task may go to another session now."""
        if not self.idle_actors or not self.behaviour.stops_quietly:
            return None  # (a stopped() hook must run before the slot is free)
        for _ in range(4):  # (a few tries: one that has work stays)
            actor = self.idle_actors.pop()
            if (
                actor.session_id not in batch
                and not actor.has_new_work()
                and actor.in_flight is None
                and not actor.dropped
            ):
                return actor
            self.idle_actors.add(actor)
            if len(self.idle_actors) == 1:
                break
        return None

    def evict(self, actor: SessionActor) -> None:
        """Retire a parked actor now, its slot and task for the next session.

        Synchronous, so its slot can be given in the same step: the actor
        has nothing in flight, handed or announced, and its instance no
        stopped() hook to run (``Behaviour.stops_quietly``), so no code of
        its session runs after this. Its task stays parked until the
        successor is launched (``_launch``): it then wakes, finds its actor
        ``evicted`` and runs the successor.
        """
        assert actor.parked_task is not None
        self._remove(actor, Exit.IDLE)
        actor.evicted = True
        self.live.add(-1)

    def hand_over(self, actor: SessionActor, msgs: list[Message]) -> None:
        """Give a reserved actor the messages that were inserted claimed for it.

        ``msgs`` is empty when none was (the session had pending messages,
        or the batch failed): that only ends the reservation.
        """
        self.reserved.add(-1)
        taken = self._actors.get(actor.session_id) is actor and actor.take_handoff(msgs)
        if actor.launch:
            self._launch(actor)
        if taken:
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

    def retire(
        self, actor: SessionActor, outcome: Exit, task: trio.lowlevel.Task | None = None
    ) -> bool:
        """Let ``actor`` leave after ``outcome``; False if it must go on working.

        Synchronous on purpose: between the last look at its notices and
        handed messages and the removal from the registry there is no
        checkpoint, so a notice either arrived before (the actor goes on) or
        finds no actor (a new one starts). No message is stranded by a
        passivation. ``task``, the actor's, is free for the next session
        that starts in the freed slot (``successor``).
        """
        if outcome is not Exit.STOP and (actor.reserved or actor.handed):
            return False  # messages claimed on delivery are on their way or here
        if outcome is Exit.IDLE and not self.stopping and actor.has_new_work():
            return False
        self._remove(actor, outcome)
        if outcome is Exit.WAIT and actor.wait_until is not None:
            self.timer.schedule(actor.wait_until, actor.session_id)
        elif outcome is Exit.YIELD and not self.stopping:
            self._queue(actor.session_id, yielded=True)
        self._free_task = task
        try:
            self._after_leave()
        finally:
            self._free_task = None
        return True

    def _remove(self, actor: SessionActor, outcome: Exit) -> None:
        """Take a leaving actor out of the registry (retire, evict)."""
        assert self._actors.get(actor.session_id) is actor
        del self._actors[actor.session_id]
        self.watchdog.forget(actor)
        self.idle_watch.forget(actor)
        self._free_slot(actor)
        if log.isEnabledFor(logging.DEBUG):  # (an enum's value is a call to read)
            log.debug("actor of %r left (%s)", actor.session_id, outcome.value)
        if self.events.active:
            self.emit("actor_stopped", actor.session_id, detail=outcome.value)

    def successor(self, task: trio.lowlevel.Task) -> SessionActor | None:
        """The actor ``task`` runs next, now that its actor left (None: the task ends)."""
        return self._successors.pop(task, None) if self._successors else None

    def session_context(self) -> contextvars.Context:
        """A fresh context for a session's task: a copy of the system's."""
        return self._context.copy()

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
        operations in order, so a no-op's commit comes after theirs.) One
        no-op at a time serves every slot freed before it was submitted;
        slots freed meanwhile wait for the next.
        """
        slot, actor.slot = actor.slot, -1
        if slot < 0:
            return
        self._leaving_slots.append(slot)
        if self._slots_releasing is None:
            self._release_slots()

    def _release_slots(self) -> None:
        """Submit the no-op that frees the slots of actors that left until now."""
        slots, self._leaving_slots = self._leaving_slots, []
        self._slots_releasing = slots
        with contextlib.suppress(StoreError):
            self.store.after_commits(self._slots_released)

    def _slots_released(self) -> None:
        starts = self.store.starts
        slots, self._slots_releasing = self._slots_releasing, None
        if starts is not None and slots:
            for slot in slots:
                starts.release(slot)
        if self._leaving_slots:
            self._release_slots()

    def emit(self, kind: str, session_id: str | None = None, **fields: object) -> None:
        """Publish a status event (cheap when nobody listens: check ``events.active`` first)."""
        self.events.emit(StatusEvent(kind, self.clock.now(), session_id, **fields))  # type: ignore[arg-type]

    def on_actor_started(self, actor: SessionActor) -> None:
        log.debug("actor of %r started", actor.session_id)
        if self.events.active:
            self.emit("actor_started", actor.session_id)

    def on_acked(self, count: int = 1) -> None:
        self.processed += count
        self.outstanding.add(-count)

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
            elif self.remote_asks and msg_id in self.remote_asks:
                assert self.cluster is not None
                self.cluster.answer(msg_id, _remote.dead_outcome(reason or "its attempts ran out"))
            if self.events.active:
                self.emit("dead_lettered", session_id, message_id=msg_id, detail=reason)

    def on_rejected(self, actor: SessionActor) -> None:
        """The handler raised Reject: its message is dead-lettered, its instance is done."""
        if self.events.active:
            self.emit("actor_stopped", actor.session_id, detail="rejected")

    def retry_delay(self, attempt: int) -> float:
        """Seconds before a failed attempt ``attempt`` of a message is tried again."""
        return self.config.retry_backoff.delay(attempt, self.rng)

    def answer(self, msg_id: int, result: object) -> None:
        """The handler of ``msg_id`` returned ``result``: answer its asker, if any."""
        reply = self.replies.pop(msg_id, None)
        if reply is not None:
            reply.set_result(result)
        elif self.remote_asks and msg_id in self.remote_asks:
            assert self.cluster is not None
            self.cluster.answer(
                msg_id, _remote.value_outcome(result, self.config.max_message_bytes)
            )

    def _share_outputs(self, cluster: Cluster) -> None:
        """Subscribers of this process hear sessions run elsewhere, and the reverse."""
        max_bytes = self.config.max_message_bytes
        self.outputs.watch = cluster.subscribed
        self.outputs.forward = lambda s, value: cluster.forward(
            s, _remote.value_outcome(value, max_bytes)
        )

    def outputs_arrived(self, outputs: list[tuple[str, str]]) -> None:
        """Outputs of sessions run in other processes, for subscribers here."""
        self._arrived_send.send_nowait(outputs)

    def remote_listeners(self, sessions: frozenset[str]) -> None:
        """Subscribers in other processes listen to these sessions now."""
        self.outputs.remote = sessions

    async def _relay_outputs(self) -> None:
        async for outputs in self._arrived:
            for session_id, outcome in outputs:
                try:
                    value = _remote.decode_value(outcome)
                except ValueError as exc:
                    log.warning("an output of session %r cannot be shown here: %s", session_id, exc)
                    continue
                await self.outputs.publish_here(session_id, value)

    def local_counts(self) -> DatabaseCounts:
        """This process's running counts (see ClusterHost.local_counts)."""
        claimed = self.in_flight() + self.handed_here()
        return DatabaseCounts(
            pending=self.outstanding.value - claimed,
            in_flight=claimed,
            dead=self.dead,
            processed=self.processed,
        )

    def handed_here(self) -> int:
        """Messages claimed for this process's actors whose handler has not
        started (statistics count them pending; see ClusterHost)."""
        return sum(len(actor.handed) for actor in self._actors.values())

    def replies_arrived(self, replies: list[tuple[int, str]]) -> None:
        """Answers for this process's asks, from the processes that ran them."""
        for msg_id, outcome in replies:
            reply = self.replies.pop(msg_id, None)
            if reply is not None:
                _remote.settle(reply, msg_id, outcome)
            elif len(self.early_replies) < _EARLY_REPLIES:
                self.early_replies[msg_id] = outcome

    def on_attempt_failed(
        self,
        session_id: str,
        msg: Message,
        failure: BaseException,
        dead: bool,
        text: FailureText | None = None,
        answer: bool = True,
    ) -> None:
        """Log a failed attempt, answer its asker, count it (and its dead letter).

        ``text`` is the failure made text once (``describe``): nothing here
        calls repr() or str() on the user's exception. Without ``answer``
        the asker waits on (a message of a failed batch is retried alone:
        that attempt's outcome is its answer).
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
        if answer and self.replies and not issubclass(type(failure), ActorKilledError):
            # The handler's own outcome (it raised, or timed out) answers an
            # asker; a kill does not: the message is tried again.
            reply = self.replies.pop(msg.id, None)
            if reply is not None:
                reply.set_error(failure)
        if (
            answer
            and self.remote_asks
            and msg.id in self.remote_asks
            and not issubclass(type(failure), ActorKilledError)
        ):
            assert self.cluster is not None
            self.cluster.answer(
                msg.id, _remote.error_outcome(_kind(failure).removeprefix("builtins."), text.report)
            )
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

    def _start(
        self, session_id: str, *, launch: bool = True, carrier: SessionActor | None = None
    ) -> SessionActor | None:
        """Start an actor for ``session_id``: in the parked task of ``carrier``
        (evicted), or the task retire() freed (after its actor), or in a new
        task. None if none can start. ``launch=False``: its task runs at
        ``_launch`` (hand_over), not before."""
        assert session_id not in self._actors
        if self._nursery is None:
            return None  # stopped; the work stays in the database for the next start
        if self.cluster is not None and not self.cluster.owns(session_id):
            return None  # (it left this process while waiting for a slot)
        actor = SessionActor(session_id, self)
        task = carrier.parked_task if carrier is not None else None
        if task is None:
            task, self._free_task = self._free_task, None
            # (The freed task goes on with it in the same step: it switches
            # to a fresh context itself.)
            actor.fresh_context = task is not None
        if task is not None:
            self._successors[task] = actor
        elif launch and not self._spawn(actor):
            return None
        if not launch:
            # (Fields, not a closure: what an activation allocates, the
            # collector walks.)
            actor.launch = True
            actor.carrier = carrier
        self._actors[session_id] = actor
        self.live.add(1)
        return actor

    def _spawn(self, actor: SessionActor, *, registered: bool = False) -> bool:
        """Start ``actor``'s task. False if the nursery closed (the system is failing)."""
        try:
            if self._nursery is None:
                raise RuntimeError("the supervisor's nursery is closed")
            # Run in a copy of the system's context: the task's context is
            # a copy of the spawner's (which may be another session's).
            self._context.run(self._nursery.start_soon, actor.run)
        except RuntimeError:
            # The nursery closed before run()'s finally could say so: the
            # work stays in the database (what was handed is recovered at
            # the next start: its handler never started).
            self.stopping = True
            if registered:
                self.forget(actor)
            return False
        return True

    def _launch(self, actor: SessionActor) -> None:
        """Let the task of an actor started for a handoff run it (see _start):
        wake the evicted actor's task that carries it, in a fresh context, or
        spawn one."""
        carrier, actor.carrier = actor.carrier, None
        actor.launch = False
        if carrier is None:
            self._spawn(actor, registered=True)
            return
        task = carrier.parked_task
        if task is not None:  # (None: cancelled meanwhile, and it abandoned this one)
            task.context = self.session_context()  # (trio runs each step in task.context)
            carrier.unpark()

    def _queue(self, session_id: str, *, yielded: bool = False) -> None:
        """Put ``session_id`` at the back of the line for a slot (see WaitingLine.add).

        A session that ``yielded`` frees a slot as it joins, which takes a
        session off the line at once, so the line does not grow.
        """
        overflowed = self.line.add(session_id, yielded=yielded, next_seq=self.store.next_seq)
        if overflowed and len(self._actors) < self.config.max_active:
            self._want_refill()
        if len(self._actors) >= self.config.max_active and self.idle_actors:
            # Free a slot: an idle actor leaves at once.
            self.idle_actors.pop().wake()

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
        line = self.line
        while len(self._actors) < max_active:
            session_id = line.pop()
            if session_id is None:
                break
            if session_id not in self._actors:
                self._start(session_id)
        if line.overflow and len(self._actors) < max_active:
            self._want_refill()

    def _want_refill(self) -> None:
        self._refill_wanted.set()

    async def _refill_loop(self) -> None:
        line = self.line
        while True:
            await self._refill_wanted.wait()
            self._refill_wanted = trio.Event()
            while (
                line.overflow
                and line.front_empty
                and not self.stopping
                and len(self._actors) < self.config.max_active
            ):
                generation = line.generation()
                exclude = frozenset(self._actors) | line.behind
                limit = _line.WAITING_LIMIT
                found = await self.store.sessions_with_work(limit, exclude)
                line.refilled(found, len(found) < limit, generation, self._actors.keys())
                self._fill()
