"""One session's actor: a written state machine that claims, runs and acks its messages.

A :class:`SessionActor` lives in the supervisor's registry while its session
is active. It runs *incarnations* one after another: each incarnation is a
fresh instance of the user's actor, so a crash never leaks state into the
next attempt. Where it is at any moment is its :class:`Phase`; every change
of phase goes through ``ActorState._to``, which asserts that the change is
one of :data:`TRANSITIONS` (the table in docs/architecture.md, checked
against this one by tests/test_state_machine.py).

Serving is a loop of a synchronous decision (:meth:`SessionActor._next_step`:
what to do next, given the phase and what is known) and the awaits that
carry it out, as trio's ``send_nowait``/``send`` split decisions from waits.

The database is the source of truth for order. Every message reaches the
handler claimed in the database, its attempt counted: either by the actor's
own claim, which reads the session's head (and, in bulk, the fresh messages
queued right behind it) in the transaction that counts the attempts, or
inserted claimed by the router and handed to the actor (claim on delivery,
only when nothing of the session waits in the database). Both kinds wait in
the ``handed`` queue (bulk-claimed ones at its front), at most
``mailbox_size`` of each, in seq order; whatever ends an incarnation gives
back those not started, so no in-memory queue can disagree with what is
durable. A notice is an integer (``notified_seq``: "work committed up to
seq N"); an actor with nothing to do parks until a notice beyond what it
claimed, a handoff or a wake-up reschedules it. Acks are pipelined: the
next handed message runs while the previous ack commits (acks commit in
order; the start table keeps recovery honest).

The actor sees its supervisor only through :class:`ActorHost`, and its
handler's context only through :class:`~actors._session.SessionData`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._actor_state import ActorState
from ._errors import ActorKilledError, HandlerTimeoutError, StoreError
from ._failure import FailureText, describe, failure_of, rejected
from ._host import ActorHost, Instance
from ._phases import Cancel, Exit, Phase, Step
from ._records import Message
from ._session import SessionData
from .store import Ack, BatchAck, Claim, StartMarks

log = logging.getLogger("actors.actor")


# The members the per-message path reads, as module globals: Python 3.11
# reads ``Phase.RUNNING`` through EnumType.__getattr__'s hook, a bound
# method made and called per read, several times per message
# (docs/performance.md, "What the redesign of issue 17 costs").
_HOLDING, _RUNNING, _CLAIMING, _IDLE = Phase.HOLDING, Phase.RUNNING, Phase.CLAIMING, Phase.IDLE
_TAKE_HANDED, _CLAIM, _NEXT, _AWAIT_WORK = Step.TAKE_HANDED, Step.CLAIM, Step.NEXT, Step.AWAIT_WORK
_LOAD_AND_TAKE = Step.LOAD_AND_TAKE
_TIMED_OUT = Cancel.TIMED_OUT


class _Serving:
    """One serving period's working set (SessionActor._serve).

    It also holds what the per-message path reads of the host, read once
    per period: each read of the host is an attribute lookup, and the ack's
    callback a bound method made anew, per message.
    """

    __slots__ = (
        "ack",
        "acked",
        "alone",
        "ctx",
        "data",
        "handle",
        "instance",
        "max_batch",
        "may_start",
        "starts",
        "store",
        "timeout",
        "trio_time",
        "watchdog",
    )

    def __init__(
        self,
        host: ActorHost[SessionActor],
        instance: Instance,
        data: SessionData,
        ctx: Any,
        has_slot: bool,
    ) -> None:
        self.instance = instance
        store = self.store = host.store
        # The start table, if this actor has a slot in it.
        self.starts: StartMarks | None = store.starts if has_slot else None
        # A clustered store's check that this process's lease is fresh
        # enough to start a handler (None: one process owns the database).
        cluster = store.cluster
        self.may_start: Callable[[], bool] | None = (
            cluster.may_start if cluster is not None else None
        )
        self.data = data
        self.ctx = ctx
        behaviour = host.behaviour
        function = behaviour.function
        # 0, or the largest batch the handler takes (its calls get a list).
        self.max_batch = behaviour.max_batch
        self.handle: Callable[[Any, Any], Awaitable[Any]] = (
            function
            if function is not None
            else instance.handle_batch
            if self.max_batch
            else instance.handle
        )
        self.acked = host.acks_committed
        self.timeout = host.config.handler_timeout
        self.watchdog = host.watchdog
        self.trio_time = host.trio_time
        # The previous message's ack when it is not yet submitted: it goes
        # with the next claim, or is flushed before a wait.
        self.ack: int | Ack | None = None
        self.alone = False  # this actor holds the isolation (see Supervisor.isolate)


class SessionActor(ActorState):
    """A session's actor: its task, which runs incarnations of the user's actor.

    Its state and the synchronous calls others make are :class:`ActorState`'s;
    here is what the task does: start, serve (the decision and the awaits),
    and recover from a crash.
    """

    __slots__ = ()

    _host: ActorHost[SessionActor]

    # -- the actor's task ---------------------------------------------------

    async def run(self) -> None:
        """Serve this session, then each session the supervisor gives this task next.

        A task outlives its session: when the actor leaves, the supervisor
        may hand the task the next session to start (``Supervisor.retire``
        and ``evict``), which spares a new task, and keeps the task's
        cancel scope until a kill or a time-out spends it (entering one is
        a CancelStatus, a context manager and the deadline bookkeeping).
        Each session runs in a fresh copy of the context ``run_system``
        was entered in (``ActorHost.session_context``): sessions never see
        each other's context variables.
        """
        task = trio.lowlevel.current_task()
        actor: SessionActor | None = self
        carried: Exit | None = None
        while actor is not None:
            with trio.CancelScope() as scope:
                actor, carried = await actor.activation(task, scope, carried)
                # (An outcome is carried out of a scope only when it is spent.)
                while actor is not None and carried is None:
                    actor, carried = await actor.activation(task, scope, None)

    async def activation(
        self, task: trio.lowlevel.Task, scope: trio.CancelScope, carried: Exit | None
    ) -> tuple[SessionActor | None, Exit | None]:
        """Incarnations of this session in ``scope`` until it leaves, or the scope is spent.

        ``carried``: how the last incarnation ended, when a kill or a
        time-out spent the scope it ran in (``_cut_instance`` set if the
        cancellation cut it): settled here first, in a fresh scope. Returns
        the actor the task serves next (this one again when the scope is
        spent, a successor, or None), and the outcome carried to it.
        """
        host = self._host
        host.actor_tasks[task] = self  # (once per activation: see System._calling_actor)
        if self.fresh_context:
            # A fresh context for this session; trio runs each step of the
            # task in task.context, so it holds from the next step on.
            self.fresh_context = False
            task.context = host.session_context()
            await trio.lowlevel.cancel_shielded_checkpoint()
        # One frame, not a wrapper around the loop: every resumption of the
        # actor's task walks its chain of coroutines.
        try:
            while True:
                outcome: Exit | None
                if carried is not None:
                    outcome, carried = carried, None
                    if self._cut_instance is not None:
                        outcome = await self._after_cut()
                else:
                    outcome = await self._incarnation(scope)
                    if self._cancel is not None:
                        # kill() or time_out() cancelled the scope (they
                        # set _cancel as they do, and only while the
                        # incarnation runs): settled in the next scope,
                        # this one is spent.
                        assert outcome is not None
                        return self, outcome
                if (outcome is Exit.CRASH or outcome is Exit.START_FAILED) and self.dropped:
                    # Cancelled because the session left this process: no
                    # crash to record (the store refuses it anyway).
                    await self._release_in_flight()
                    outcome = Exit.STOP
                elif outcome is Exit.CRASH or outcome is Exit.START_FAILED:
                    outcome = await self._recover(outcome is Exit.START_FAILED)
                if self.evicted:
                    break  # (the supervisor retired it already: see Supervisor.evict)
                if outcome is not None and host.retire(self, outcome, task):
                    break
        except BaseException as exc:
            # Cancelled by a hard stop (or the system failing): the message
            # goes back to the head of its queue for the next start. If its
            # handler started, the attempt stays counted, so the redelivery
            # says attempt > 1. Anything else escaping a handler
            # (KeyboardInterrupt, SystemExit) is treated like a dead process.
            await self._release_in_flight(crashed=not isinstance(exc, trio.Cancelled))
            host.forget(self)
            self._to(Phase.LEFT)
            successor = host.successor(task)
            if successor is not None:
                await successor.abandon()
            raise
        finally:
            del host.actor_tasks[task]
        self._to(Phase.LEFT)
        return host.successor(task), None

    async def abandon(self) -> None:
        """Leave without running: the task meant to run this actor ends (a hard
        stop, the system failing). What was handed to it goes back."""
        await self._release_in_flight()
        self._host.forget(self)
        self._to(Phase.LEFT)

    async def _recover(self, start_failed: bool) -> Exit | None:
        """After a crash: record it, then how to leave (None: start again now)."""
        host = self._host
        delay, nothing_to_start = await self._after_crash(start_failed)
        if host.stopping or self.dropped:
            await self._release_in_flight()
            return Exit.STOP
        if nothing_to_start:
            return Exit.IDLE  # (it stays if work came: retire() says)
        if delay > 0 and (delay > host.config.idle_timeout or host.line.has_waiters):
            # Leave the slot. The wait must be on the head in the database,
            # or nothing would bring the session back.
            if self.wait_until is None:
                until = host.clock.now() + delay
                store = host.store
                if await store.defer_head(self.session_id, until):
                    self.wait_until = until
            return Exit.IDLE if self.wait_until is None else Exit.WAIT
        self._to(Phase.BACKOFF)
        await self._wait(delay)
        if not host.stopping:
            return None
        return Exit.STOP  # (woken by the stop: no instance to start for it)

    async def _incarnation(self, scope: trio.CancelScope) -> Exit:
        """One instance of the user's actor, run in ``scope`` (the task's).

        kill() and the Watchdog's time_out() cancel ``scope`` (through
        ``_scope``, set only while the incarnation runs); the caller then
        leaves the spent scope and settles the cut (``_after_cut``).
        """
        host = self._host
        self._to(Phase.STARTING)
        data = SessionData(
            self.session_id, host.clock.now, host.outputs, host.store.max_value_bytes
        )
        ctx = host.new_context(data)
        self._cancel = None
        self._failure = None
        self._failure_text = None
        self.turn = 0
        self.caught_up, self.fresh_handoff = self.fresh_handoff, False
        outcome = Exit.CRASH
        instance: Instance | None = None
        cut = False
        self._scope = scope
        try:
            behaviour = host.behaviour
            instance = behaviour.new_instance()
            if behaviour.loads_state_at_start:
                await self._run_started(instance, data, ctx)
            # (Otherwise started() is Actor's, which does nothing: not
            # called, a coroutine fewer per activation.)
            host.on_actor_started(self)
            outcome = await self._serve(instance, data, ctx)
        except StoreError:
            raise
        except trio.Cancelled as exc:
            if scope.cancel_called:
                cut = True
            else:  # a hard stop (re-raised), or a stray one started() raised: a crash
                outcome = self._start_failed(exc)
        except BaseException as exc:  # the factory or started() failed: a crash
            outcome = self._start_failed(exc)
        else:
            if outcome is not Exit.CRASH and outcome is not Exit.TIMEOUT and not self.evicted:
                # (An evicted actor has no stopped() of its own: it goes
                # from idle to left, see Supervisor.evict.)
                await self._stop_instance(instance, ctx)
        finally:
            self._scope = None
            host.end_isolation(self)
        if cut or outcome is Exit.TIMEOUT:
            # Cancelled by kill() or by time_out() (a kill wins); or the
            # handler timed out as it raised or returned (Exit.TIMEOUT).
            # (A kill that came with nothing left to cancel ends nothing.)
            self._cut_instance = (instance, ctx)
            if not scope.cancel_called:
                return await self._after_cut()
            return Exit.CRASH
        return outcome

    async def _after_cut(self) -> Exit:
        """Settle an incarnation that a kill or a time-out ended: a crash, and its failure."""
        assert self._cut_instance is not None
        instance, ctx = self._cut_instance
        self._cut_instance = None
        if self._cancel is Cancel.TIMED_OUT:
            assert instance is not None  # (only a running handler times out)
            killed = await self._stop_timed_out(instance, ctx)
        else:
            # A kill; but one that lands in stopped() after the handler
            # raised does not hide the handler's own error.
            killed = self._failure is None
        if killed:
            self._failure = ActorKilledError(f"actor of session {self.session_id!r} was killed")
        return Exit.CRASH

    async def _run_started(self, instance: Instance, data: SessionData, ctx: Any) -> None:
        """The instance's own started() hook, after loading the state it may read.

        The dict it sees is the state for the whole incarnation: a reference
        kept from started() is the state handle() sees, and what started()
        changes is committed with the next message's ack. (If started() used
        it, every ack compares it: a kept reference may change it unseen.)
        """
        store = self._host.store
        data.load(await store.load_state(self.session_id))
        await instance.started(ctx)

    def _start_failed(self, exc: BaseException) -> Exit:
        """The factory or started() raised ``exc``: log it, and say so (or re-raise)."""
        failure = failure_of(exc)
        if failure is None:
            raise exc
        text = describe(failure)
        self._failure_text = (failure, text)
        log.error("starting the actor of session %r failed:\n%s", self.session_id, text.report)
        self._failure = failure
        return Exit.START_FAILED

    async def _stop_timed_out(self, instance: Instance, ctx: Any) -> bool:
        """After a handler timeout: record it, and run stopped() in a scope a kill reaches.

        Returns True if a kill cancelled stopped() (the attempt ends killed).
        """
        timeout = self._host.config.handler_timeout
        self._failure = HandlerTimeoutError(
            f"handler ran longer than handler_timeout={timeout}s and was cancelled"
        )
        with trio.CancelScope() as stopping:
            self._scope = stopping
            try:
                await self._stop_instance(instance, ctx)
            finally:
                self._scope = None
        return stopping.cancelled_caught

    async def _stop_instance(self, instance: Instance, ctx: Any) -> None:
        self._to(Phase.STOPPING)
        if self._host.behaviour.stops_quietly:
            return  # (stopped() is Actor's, which does nothing)
        try:
            await instance.stopped(ctx)
        except BaseException as exc:
            failure = failure_of(exc)
            if failure is None:
                raise
            log.error(  # (describe(): the exception may misbehave, or be huge)
                "stopped() hook of session %r raised; ignored:\n%s",
                self.session_id,
                describe(failure).report,
            )

    async def _serve(self, instance: Instance, data: SessionData, ctx: Any) -> Exit:
        # The incarnation's cancel scope serves every handler call of it as
        # its timeout: the host's Watchdog cancels it (time_out()) when a
        # running handler passes its deadline, and _incarnation tells that
        # from a kill (a scope per message, or a deadline moved around each
        # call, would cost more than the rest of the message's way through
        # the actor). Returns Exit.TIMEOUT if the handler timed out but the
        # cancellation did not propagate (it raised or returned as it came).
        serving = _Serving(self._host, instance, data, ctx, self.slot >= 0)
        # Chosen once per period: a handler of one message pays nothing for batches.
        run = self._run_batch if serving.max_batch else self._run_handler
        try:
            while True:
                step = self._next_step(serving)
                if step is _TAKE_HANDED:
                    nxt: Message | Step | Exit | None = self._take_handed(serving)
                elif step is _CLAIM:
                    nxt = await self._claim(serving)
                else:
                    nxt = await self._between(step, serving)
                if type(nxt) is Message:
                    nxt = await run(serving, nxt)
                if nxt is _AWAIT_WORK:
                    # Here, not deeper: the frames of the last message (its
                    # body, its handler's result, the claim it came with)
                    # are gone, so an idle actor keeps only its state.
                    nxt = await self._await_work()
                if isinstance(nxt, Exit):
                    return nxt
        finally:
            # No more handoffs from this period: whatever comes next claims
            # from the database (handed messages are given back first).
            self._serve_gen += 1
            self.caught_up = False

    def _next_step(self, serving: _Serving) -> Step:
        """What to do next, decided without waiting (the serve loop does the waiting)."""
        host = self._host
        if host.stopping or self.dropped:
            return Step.STOP
        if self.turn >= host.config.fair_share and host.line.has_waiters:
            # Its turn is up (counted since this activation, the messages
            # handed to it included): to the back of the line.
            return Step.YIELD
        if serving.alone and serving.ack is not None:
            return Step.END_ISOLATION  # the suspect ran: let the others go on
        isolating = host.isolation.holder
        if isolating is not None and isolating is not self:
            return Step.WAIT_ISOLATION
        if self.reserved:
            # Messages are being inserted claimed for this actor: a claim now
            # would find them in flight. Wait until they are handed.
            return Step.WAIT_HANDOFF
        if self.handed:
            data = serving.data
            if data.state is None:
                # Handed before this incarnation's first claim: the state
                # first, unless no session has any (then there is nothing
                # to wait for: it is loaded as empty here).
                if serving.store.may_have_state:
                    return _LOAD_AND_TAKE
                data.load(None)
            return _TAKE_HANDED
        return _CLAIM

    async def _between(self, step: Step, serving: _Serving) -> Message | Step | Exit:
        """Carry out a step other than taking a handed message or claiming."""
        if step is _LOAD_AND_TAKE:
            return await self._take_first_handed(serving)
        if step is Step.STOP:
            await self._flush_ack(serving)
            await self._release_in_flight()
            return Exit.STOP
        if step is Step.YIELD:
            await self._flush_ack(serving)
            await self._release_handed()  # not started: the next activation claims them
            return Exit.YIELD
        if step is Step.END_ISOLATION:
            await self._flush_ack(serving)
            self._host.end_isolation(self)
            serving.alone = False
        elif step is Step.WAIT_ISOLATION:
            await self._flush_ack(serving)
            # Nothing of ours may be in flight while a suspect runs alone:
            # give handed messages back (reserve() refuses now).
            if self.reserved:
                await self._wait_handoff()
            await self._release_handed()
            self._to(Phase.ISOLATION)
            await self._host.wait_isolation(self)
        else:
            assert step is Step.WAIT_HANDOFF
            if serving.ack is not None:
                # The message that just returned is done: its ack goes now,
                # pipelined, so a kill during the wait cannot fail it.
                serving.store.ack_soon(serving.ack, serving.acked)
                serving.ack = None
                self.in_flight = None
            await self._wait_handoff()
        return Step.NEXT

    def _take_handed(self, serving: _Serving) -> Message:
        """Take the next handed message: claimed on delivery, nothing before it in the database.

        Synchronous (the state is loaded): a message handed to a running
        actor costs no coroutine to take.
        """
        if serving.ack is not None:
            serving.store.ack_soon(serving.ack, serving.acked)
            serving.ack = None
        self._to(_HOLDING)
        msg = self.handed.popleft()
        if self._in_flight is None:  # (the in_flight setter, inline: per message)
            self._host.busy.add(1)
        self._in_flight = msg
        if msg.id > self.claimed_seq:
            self.claimed_seq = msg.id
        return msg

    async def _take_first_handed(self, serving: _Serving) -> Message:
        """Take a message handed before this incarnation's first claim: load the state first."""
        assert serving.ack is None  # (nothing ran in this incarnation yet)
        self._to(_HOLDING)
        msg = self.in_flight = self.handed[0]  # held while the state loads
        store = self._host.store
        serving.data.load(await store.load_state(self.session_id))
        self.handed.popleft()
        if msg.id > self.claimed_seq:
            self.claimed_seq = msg.id
        return msg

    async def _claim(self, serving: _Serving) -> Message | Step | Exit:
        """Claim the session's head (acking the previous message in the same transaction)."""
        host = self._host
        store = host.store
        announced = self.notified_seq  # committed before this claim runs
        self.pokes_seen = self.pokes  # (likewise)
        self._to(_CLAIMING)
        ack, data = serving.ack, serving.data
        claim: Claim = await store.claim_next(
            self.session_id,
            ack,
            host.clock.now(),
            host.config.max_attempts,
            serving.alone,
            data.state is None,
            self._bulk(serving.alone),
        )
        # Committed: the ack (if any) and the claim (if any). Record both
        # before the next checkpoint, so a kill sees the truth. (The ack's
        # outbox first: drain() must not see zero between.)
        if claim.sent:
            host.on_sent(claim.sent)
        if ack is not None:
            host.on_acked()
            serving.ack = None
        self.in_flight = claim.message
        if claim.dead:
            host.on_dead_lettered(
                self.session_id, len(claim.dead), claim.dead, "its attempts ran out"
            )
        if data.state is None:
            data.load(claim.state)
        msg = claim.message
        if msg is None:
            if serving.alone:  # nothing to run alone after all
                host.end_isolation(self)
                serving.alone = False
            return await self._claimed_nothing(serving, claim, announced)
        if claim.extra:
            # Claimed with it, and before anything handed meanwhile (a
            # handoff's insert was queued after this claim).
            self.handed.extendleft(reversed(claim.extra))
        # Nothing queued behind it: once it is handled, everything of the
        # session up to here is, and the router's notices tell of anything
        # later (so handoffs may start).
        self.caught_up = not claim.more
        if claim.seq > self.claimed_seq:
            self.claimed_seq = claim.seq
        self._to(_HOLDING)
        return msg

    async def _claimed_nothing(
        self, serving: _Serving, claim: Claim, announced: int
    ) -> Step | Exit:
        """The claim found no message to run: isolate, wait for the head, or wait for work."""
        host = self._host
        # The claim saw everything announced before it: caught up.
        self.claimed_seq = max(self.claimed_seq, announced)
        self.caught_up = claim.wait_until is None and not claim.alone
        if claim.alone:
            self._to(Phase.ISOLATION)
            await host.isolate(self)
            serving.alone = True
            return Step.NEXT
        if claim.wait_until is not None:
            delay = host.clock.to_trio(claim.wait_until) - trio.current_time()
            if delay > host.config.idle_timeout or host.line.has_waiters:
                self.wait_until = claim.wait_until
                return Exit.WAIT
            self._to(Phase.DUE)
            await self._wait(delay)
            return Step.NEXT
        return _AWAIT_WORK

    async def _run_handler(self, serving: _Serving, msg: Message) -> Step | Exit:
        """Run the handler on ``msg`` (held, claimed); then ack it as the next step allows."""
        host = self._host
        self.handler_started = False
        if host.stopping or (serving.may_start is not None and not serving.may_start()):
            # (Or the lease may have run out: this process was frozen, or
            # cut off. The message goes back; the keeper looks again.)
            await self._release_in_flight()
            return Exit.STOP
        await trio.lowlevel.checkpoint_if_cancelled()
        self.handler_started = True
        if serving.starts is not None:
            serving.starts.mark(self.slot, msg.id)  # before the handler: survives a crash
        timeout = serving.timeout
        observer = host.observer
        started_at = 0.0
        if timeout is not None or observer is not None:
            started_at = serving.trio_time()
            if timeout is not None:
                self.handler_deadline = started_at + timeout
                serving.watchdog.watch(self)
        self._to(_RUNNING)
        data = serving.data
        data.message = msg
        try:
            result = await serving.handle(serving.ctx, msg)
            # What the ack writes: the id alone unless the handler touched
            # state or the outbox, or the message has a key (then an Ack;
            # raises if the state cannot be committed).
            done = (
                data.ack(msg)
                if data.state_used or data.outbox is not None or msg.key is not None
                else msg.id
            )
        except BaseException as exc:
            data.message = None
            return await self._handler_failed(serving, exc)
        data.message = None
        # (A Cancelled from the watchdog propagates to the incarnation's scope.)
        if self._cancel is _TIMED_OUT:
            # The watchdog cancelled it just as it returned: it did outlive
            # handler_timeout, and the scope is spent.
            return Exit.TIMEOUT
        if observer is not None:
            observer(msg, serving.trio_time() - started_at)
        serving.ack = done
        if (
            (host.replies and msg.id in host.replies)
            or (result is not None and host.outputs.listening(self.session_id))
            or (host.remote_asks and msg.id in host.remote_asks)
        ):
            await self._answer_and_publish(serving, msg, result)
        return self._handled(serving)

    async def _run_batch(self, serving: _Serving, msg: Message) -> Step | Exit:
        """Run the batched handler on ``msg`` and the first deliveries handed
        behind it (see _gather); then ack them all at once.

        Its start and its timing are _run_handler's, written out in both:
        a helper shared by them would be a call more for every message.
        """
        host = self._host
        self.handler_started = False
        if host.stopping or (serving.may_start is not None and not serving.may_start()):
            await self._release_in_flight()
            return Exit.STOP
        await trio.lowlevel.checkpoint_if_cancelled()
        # No checkpoint from here to the start mark: the batch is held, and
        # its attempts spent, together.
        msgs = self._gather(serving, msg)
        self.handler_started = True
        if serving.starts is not None:
            # The last one: recovery counts every claimed message of the
            # session up to the last marked one as started.
            serving.starts.mark(self.slot, msgs[-1].id)
        timeout = serving.timeout
        observer = host.observer
        started_at = 0.0
        if timeout is not None or observer is not None:
            started_at = serving.trio_time()
            if timeout is not None:
                self.handler_deadline = started_at + timeout
                serving.watchdog.watch(self)
        self._to(_RUNNING)
        data = serving.data
        data.message = msgs[-1]
        try:
            values = _batch_values(await serving.handle(serving.ctx, msgs), len(msgs))
            done = data.ack(msg) if len(msgs) == 1 else data.ack_batch(msgs)
        except BaseException as exc:
            data.message = None
            return await self._handler_failed(serving, exc)
        data.message = None
        if self._cancel is _TIMED_OUT:
            return Exit.TIMEOUT  # (as in _run_handler)
        if observer is not None:
            each = (serving.trio_time() - started_at) / len(msgs)
            for m in msgs:
                observer(m, each)
        if type(done) is BatchAck:
            await self._commit_batch(serving, msgs, values, done)
            self.turn += len(msgs) - 1  # (and _handled counts one)
        else:
            # A batch of one is acked as a message handled alone.
            serving.ack = done
            result = values[0] if values is not None else None
            if (
                (host.replies and msg.id in host.replies)
                or (result is not None and host.outputs.listening(self.session_id))
                or (host.remote_asks and msg.id in host.remote_asks)
            ):
                await self._answer_and_publish(serving, msg, result)
        return self._handled(serving)

    def _gather(self, serving: _Serving, msg: Message) -> list[Message]:
        """The batch that starts with ``msg`` (held): it and the first deliveries
        handed behind it, up to ``max_batch``. Never waits for more.

        A redelivery (attempt > 1: a retry after a failure, or a crash
        suspect) runs alone: so a failed batch's messages are tried one at a
        time, and a poison message is dead-lettered without its neighbours.
        """
        if msg.attempt > 1 or serving.alone or not self.handed:
            return [msg]
        msgs = [msg]
        handed, limit = self.handed, serving.max_batch
        while handed and len(msgs) < limit and handed[0].attempt == 1:
            msgs.append(handed.popleft())
        if len(msgs) > 1:
            self._batch = msgs
            last = msgs[-1].id
            if last > self.claimed_seq:
                self.claimed_seq = last
        return msgs

    async def _commit_batch(
        self, serving: _Serving, msgs: list[Message], values: list[Any] | None, done: BatchAck
    ) -> None:
        """The batch's handler returned: ack it (one transaction), answer, publish."""
        host = self._host
        replies, remote = host.replies, host.remote_asks
        if (replies or remote) and any(m.id in replies or m.id in remote for m in msgs):
            # Answered once the ack has committed, as a message alone is.
            self._to(Phase.ACKING)
            sent = await serving.store.ack(done)
            self._batch_done()
            if sent:
                host.on_sent(sent)
            host.on_acked(len(msgs))
            for i, m in enumerate(msgs):
                host.answer(m.id, values[i] if values is not None else None)
        if values is not None and host.outputs.listening(self.session_id):
            # Before the ack otherwise, as for a message alone: drain() waits
            # for the outputs, and a kill meanwhile runs the batch again.
            self._to(Phase.EMITTING)
            for value in values:
                if value is not None:
                    await host.outputs.publish(self.session_id, value)
        if self._batch is not None:
            serving.store.ack_soon(done, serving.acked)
            self._batch_done()

    def _batch_done(self) -> None:
        """The batch's ack is submitted: it holds nothing any more."""
        self._batch = None
        self.in_flight = None

    def _held_batch(self, msg: Message | None) -> list[Message] | None:
        """The batch that ``msg`` (in flight) heads, if it heads one."""
        batch = self._batch
        return batch if batch is not None and msg is not None and batch[0] is msg else None

    async def _handler_failed(self, serving: _Serving, exc: BaseException) -> Exit:
        # An Exception fails the attempt, and so does a Cancelled that is
        # not for this task (caught by the handler from an inner scope and
        # raised again outside it): let through, no scope of ours would
        # catch it, and the supervisor's nursery would end quietly.
        # KeyboardInterrupt and the like (and a real cancellation) go on.
        failure = failure_of(exc)
        if failure is None:
            raise exc
        if self._cancel is Cancel.TIMED_OUT:
            return Exit.TIMEOUT  # the watchdog cancelled it as it raised
        self._failure = failure
        await self._stop_instance(serving.instance, serving.ctx)
        return Exit.CRASH

    async def _answer_and_publish(self, serving: _Serving, msg: Message, result: Any) -> None:
        """The handler returned and an ask waits for ``msg``, or someone listens to the outputs."""
        host = self._host
        if (host.replies and msg.id in host.replies) or (
            host.remote_asks and msg.id in host.remote_asks
        ):
            # An ask waits for this message: it gets the result once the ack
            # has committed (not pipelined), so a reply says the state and
            # the outbox are durable. (The call is shielded: a kill
            # meanwhile lands after the answer.)
            await self._flush_ack(serving)
            host.answer(msg.id, result)
        if result is not None and host.outputs.listening(self.session_id):
            # Backpressure: wait for the slowest subscriber. (A kill here
            # drops the ack: the message runs again, as after any kill.)
            self._to(Phase.EMITTING)
            await host.outputs.publish(self.session_id, result)

    def _handled(self, serving: _Serving) -> Step:
        """The handler returned (answered, published): pipeline the ack; what next.

        Synchronous: with no ask waiting and nobody listening, a message's
        way from its handler's return to the next decision has no await.
        """
        host = self._host
        self.turn += 1
        if not (
            self.caught_up
            and self.notified_seq <= self.claimed_seq
            and self.pokes == self.pokes_seen
            and not serving.alone
        ):
            return _NEXT  # the ack goes with the next claim, or before the next wait
        # Nothing is known to follow: commit the ack without waiting for it
        # (no claim that would find nothing), and wait for work. The store
        # commits operations in order, so any later claim of this session
        # commits after this ack.
        ack = serving.ack
        if ack is not None:
            if self._in_flight is not None:  # (the in_flight setter, inline)
                host.busy.add(-1)
                self._in_flight = None
            serving.store.ack_soon(ack, serving.acked)
            serving.ack = None
        if self.handed and not host.stopping:
            # The next message is here already: no wait, and no checkpoint
            # (the queue is bounded, and the router only refills it when
            # this task yields).
            return _NEXT
        return _AWAIT_WORK

    def _bulk(self, alone: bool) -> int:
        """How many messages behind the head a claim may take too (see Store.claim_next)."""
        if alone:
            return 0  # a crash suspect runs alone: nothing else of ours in flight
        host = self._host
        mailbox_size = host.config.mailbox_size
        if host.line.has_waiters:  # no more than this turn will run before it yields
            return max(0, min(mailbox_size, host.config.fair_share - self.turn - 1))
        return mailbox_size

    async def _flush_ack(self, serving: _Serving) -> None:
        """Commit the pending ack (if any) and wait for it."""
        ack = serving.ack
        if ack is None:
            return
        serving.ack = None
        self._to(Phase.ACKING)
        host = self._host
        sent = await host.store.ack(ack)
        self.in_flight = None
        if sent:  # first: drain() must not see zero between
            host.on_sent(sent)
        host.on_acked()

    # KI-protected: a KeyboardInterrupt between registering the task and
    # parking it would leave the registration behind, and the task would be
    # rescheduled after it exited (TrioInternalError). Protected, trio
    # delivers it at the wait instead (the wait's abort undoes the
    # registration). tests/test_adversarial_trio.py injects it at each line.
    @trio.lowlevel.enable_ki_protection
    async def _await_work(self) -> Exit | None:
        """Nothing to do: wait for work beyond what was claimed, or a handoff.

        Returns how to leave instead, if the actor should: the system stops,
        others wait for a slot, or ``idle_timeout`` passed (or wake() cut the
        wait short) with nothing new. One coroutine, not two: an idle
        actor's wait is once per message, and what it allocates is what
        Python's collector promotes while the actor waits.
        """
        host = self._host
        if host.line.has_waiters:
            return Exit.STOP if host.stopping else Exit.IDLE
        self._to(_IDLE)
        if self.handed or self.notified_seq > self.claimed_seq or self.pokes != self.pokes_seen:
            await trio.lowlevel.checkpoint()
            return None
        if host.stopping or self.dropped:  # (woken for it before we got here)
            await trio.lowlevel.checkpoint()
            return Exit.STOP
        self.idle_deadline = host.clock.trio_time() + host.config.idle_timeout
        host.idle_watch.watch(self)
        self._parked = trio.lowlevel.current_task()
        host.idle_actors.add(self)
        await trio.lowlevel.wait_task_rescheduled(self._abort_park)
        if self.handed or self.notified_seq > self.claimed_seq or self.pokes != self.pokes_seen:
            return None
        return Exit.STOP if host.stopping else Exit.IDLE

    @trio.lowlevel.enable_ki_protection  # (as _await_work: registers, then parks)
    async def _wait_handoff(self) -> None:
        """Wait until the reservation (``self.reserved``) is settled by take_handoff()."""
        self._to(Phase.HANDOFF)
        self._handoff_waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort_handoff_wait)

    def _releasing(self) -> None:
        # Failing includes giving back what the actor holds; from any other
        # phase, giving back is a phase of its own (entered once: giving back
        # the message in flight gives back the handed ones too).
        if self.phase is not Phase.FAILING and self.phase is not Phase.RELEASING:
            self._to(Phase.RELEASING)

    async def _release_handed(self) -> None:
        """Give back every handed message (they were never started)."""
        if not self.handed:
            return
        self._releasing()
        ids = [m.id for m in self.handed]
        self.handed.clear()
        self.caught_up = False
        # If the store failed, the rows stay in flight and are recovered
        # (attempt given back: never started) at the next start.
        with contextlib.suppress(StoreError):
            store = self._host.store
            await store.release_many(ids)

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds unless woken (stop, a waiter, an abort)."""
        if delay <= 0 or math.isnan(delay) or self._host.stopping:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_after(delay) as scope:
            self._wait_scope = scope
            try:
                await trio.sleep_forever()
            finally:
                self._wait_scope = None

    # -- after a crash ----------------------------------------------------

    async def _after_crash(self, start_failed: bool) -> tuple[float, bool]:
        """Record the failed attempt; return (seconds before the next incarnation,
        whether the session has nothing at all to start for).

        The failure is turned into text here, once and safely (describe():
        a user's exception may misbehave in repr() or str(), or hold text
        the database cannot store), and only that text goes on.
        """
        self._to(Phase.FAILING)
        host = self._host
        failure = self._failure or ActorKilledError("actor crashed")
        made, self._failure_text = self._failure_text, None
        text = made[1] if made is not None and made[0] is failure else describe(failure)
        msg = self.in_flight
        batch = self._held_batch(msg)
        # A Reject from the handler dead-letters its message now. It is an
        # outcome the handler chose, not a crash: the restart policy does
        # not count it, and the next incarnation starts at once. (From a
        # batch, it says not which message: each is tried alone.)
        rejection = (
            rejected(failure)
            if msg is not None and self.handler_started and batch is None
            else None
        )
        if rejection is None:
            delay, _suspended = host.on_restart(self, failure, text.summary)
        else:
            delay = 0.0
            host.on_rejected(self)  # its instance is done (stopped() ran)
        await self._release_handed()
        if start_failed and msg is None and not host.stopping:
            msg = await self._charge_failed_start()
            if msg is None:  # nothing due to charge: wait for the head, or leave
                if self.wait_until is None:
                    return delay, True
                now = host.clock.now()
                self.wait_until = max(self.wait_until, now + delay)
                return self.wait_until - now, False
        if msg is not None and not self.handler_started:
            await self._release_in_flight()
            msg = None
        if batch is not None:
            return await self._fail_batch(batch, failure, text, delay), False
        if msg is not None:
            return await self._fail_attempt(msg, failure, text, delay, rejection is None), False
        self.wait_until = None
        return delay, False

    async def _fail_attempt(
        self, msg: Message, failure: BaseException, text: FailureText, delay: float, retry: bool
    ) -> float:
        """Fail ``msg``'s attempt in the store: retry it later, or dead-letter it."""
        host = self._host
        config = host.config
        if retry:
            retry_delay = max(delay, host.retry_delay(msg.attempt))
            max_attempts = config.max_attempts
        else:
            retry_delay, max_attempts = 0.0, 0  # (rejected: Store.fail finds no attempt left)
        retry_at = host.clock.now() + retry_delay
        store = host.store
        outcome = await store.fail(msg.id, text.report, retry_at, max_attempts)
        self.in_flight = None
        host.on_attempt_failed(self.session_id, msg, failure, outcome == "dead", text)
        if outcome == "retry":
            self.wait_until = retry_at
            return retry_delay
        self.wait_until = None
        return delay

    async def _fail_batch(
        self, batch: list[Message], failure: BaseException, text: FailureText, delay: float
    ) -> float:
        """Fail the attempt of every message of a batch: each is retried alone
        (they come back as redeliveries), or dead-lettered if its attempts ran out.

        An ask of a message that is retried waits for that attempt (see
        Supervisor.on_attempt_failed).
        """
        host = self._host
        max_attempts = host.config.max_attempts
        # First deliveries all: one backoff for the batch.
        retry_delay = max(delay, host.retry_delay(batch[0].attempt))
        retry_at = host.clock.now() + retry_delay
        store = host.store
        retried = False
        for m in batch:
            outcome = await store.fail(m.id, text.report, retry_at, max_attempts)
            host.on_attempt_failed(
                self.session_id, m, failure, outcome == "dead", text, answer=outcome != "retry"
            )
            retried = retried or outcome == "retry"
        self._batch_done()
        self.wait_until = retry_at if retried else None
        return retry_delay if retried else delay

    async def _charge_failed_start(self) -> Message | None:
        """Claim the session's head message to fail it: a failed start is its attempt.

        Invariant 5 (no crash loop): a constructor or ``started()`` that
        raises at every start would otherwise restart the actor for ever,
        counting no attempt (nothing was claimed yet), its messages never
        dead-lettered and ``drain()`` never returning. Charged to the head,
        the failure retries it with backoff, and dead-letters it (with the
        start's error) after ``max_attempts``, like a handler's failure;
        then the next message. The claim is made as if alone: no handler
        runs, so a crash suspect at its last attempt need not wait for the
        system to run it alone. Returns the claimed message (in flight,
        counted as started), or None if the session has nothing due (then
        ``wait_until`` is when its head is, or None if there is nothing).
        """
        host = self._host
        store = host.store
        claim: Claim = await store.claim_next(
            self.session_id,
            None,
            host.clock.now(),
            host.config.max_attempts,
            True,
        )
        if claim.dead:
            host.on_dead_lettered(
                self.session_id, len(claim.dead), claim.dead, "its attempts ran out"
            )
        if claim.seq > self.claimed_seq:  # (as a claim in _claim: notices up to it are seen)
            self.claimed_seq = claim.seq
        if claim.message is None:
            self.wait_until = claim.wait_until
            return None
        self.in_flight = claim.message
        self.handler_started = True  # (the attempt was used: a hard stop keeps it counted)
        return claim.message

    async def _release_in_flight(self, *, crashed: bool = False) -> None:
        """Put the held messages back; an attempt is given back if no handler started."""
        self._releasing()
        await self._release_handed()
        msg = self.in_flight
        if msg is None:
            return
        held = self._held_batch(msg) or [msg]
        self._batch_done()
        uncount = not self.handler_started
        # If the store failed, the rows stay in flight and are recovered at the next start.
        with contextlib.suppress(StoreError):
            store = self._host.store
            for m in held:
                await store.release(m.id, uncount, crashed and not uncount)


def _batch_values(result: object, size: int) -> list[Any] | None:
    """What a batched handler returned, checked: None, or one value per message.

    Raises TypeError or ValueError otherwise (the batch fails).
    """
    if result is None:
        return None
    if type(result) is not list:
        raise TypeError(
            "a batched handler returns None or a list of one value per message "
            f"({size} for this batch), got {type(result).__name__}"
        )
    if len(result) != size:
        raise ValueError(
            f"a batched handler returned {len(result)} values for a batch of {size} "
            f"messages: return a list of {size} (one per message, in order) or None"
        )
    return result
