"""``run_system`` and the :class:`System` facade that its ``async with`` yields."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio
from trio_util import periodic

from ._actor import SessionActor
from ._bridge import Bridge
from ._clock import Clock
from ._codec import check_key, check_session_id, encode_body
from ._config import Config
from ._control import Control
from ._errors import ActorsError, AskTimeoutError, StoreError, SystemClosedError
from ._health import Health, HealthMonitor
from ._host import Behaviour
from ._purge import purge_batches
from ._records import DeadLetter, Message, SystemStatistics
from ._remote import settle
from ._reply import Reply
from ._router import Batch, Router
from ._session import SessionData
from ._streams import HandlerObserver, HandlerObservers, StatusEvent, Subscription
from ._supervisor import Supervisor
from ._validate import (
    check_int,
    check_message_id,
    check_number,
    check_seconds,
    purge_scope,
)
from .store import Cluster, MessageState, Opened, Store, StoreViews
from .store.backends import open_views

log = logging.getLogger("actors.system")

KEY_SWEEP_LIMIT = 10_000  # keys forgotten per sweep transaction
# drain() on a cluster reads the database's counts again at least this often.
_DRAIN_POLL = 0.1


class System:
    """A running system. Get one from ``async with run_system(...) as system``.

    All methods must be called from the trio thread that runs the system.
    """

    def __init__(
        self,
        *,
        path: str,
        target: str | None = None,
        store: Store,
        opened: Opened,
        config: Config,
        behaviour: Behaviour,
        make_context: Callable[[str, System, SessionData], object],
        rng: random.Random | None,
    ) -> None:
        self.path = path
        # What read views open: the database's path, or its URL with the
        # password that ``path`` does not show.
        self._target = path if target is None else target
        self.config = config
        self._store = store
        self._clock = Clock()
        self._sup = Supervisor(
            store=store,
            clock=self._clock,
            config=config,
            behaviour=behaviour,
            new_context=lambda data: make_context(data.session_id, self, data),
            pending=opened.pending,
            dead=opened.dead,
            rng=rng,
        )
        self._timer = self._sup.timer
        self._router = Router(store, self._sup, self._timer, config.key_retention)
        self._closed = False
        self._nursery: trio.Nursery | None = None
        # The stop (shutdown(), or leaving the block): begun at most once.
        # _body is the cancel scope around the code of the async with block
        # (shutdown() cancels it); _stop_done is set once handlers finished
        # or were cancelled and their acks committed; _stopped once the
        # store is closed (run_system's finally), whatever ended the run.
        self._stop_begun = False
        self._stop_done = trio.Event()
        self._stopped = trio.Event()
        self._body: trio.CancelScope | None = None
        self.recovered = opened.recovered
        self._observers = HandlerObservers(self._set_observer)
        self._health = HealthMonitor(self.statistics, self._clock)
        self._control = Control(self, store, self._clock.now, config.control_interval)

    # -- lifecycle (run_system) -------------------------------------------

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        """Run the system's tasks around the ``async with`` block, then stop and close the store."""
        try:
            async with _single_error(), trio.open_nursery() as nursery:
                await self._start(nursery)
                try:
                    # shutdown() cancels the block's code through this scope,
                    # which absorbs that cancellation: the stop goes on below
                    # and the block exits normally.
                    with trio.CancelScope() as body:
                        self._body = body
                        yield
                except BaseException:
                    self._closed = True
                    nursery.cancel_scope.cancel()
                    raise
                finally:
                    self._body = None
                await self._shutdown(nursery)
        finally:
            self._close_streams()
            try:
                await self._store.aclose()
            finally:
                self._stopped.set()

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        log.info(
            "system started on %r: %d pending, %d dead, %d recovered from a previous crash",
            self.path,
            self._sup.outstanding.value,
            self._sup.dead,
            self.recovered,
        )
        await nursery.start(self._sup.run)
        cluster = self._store.cluster
        if cluster is not None:
            # This process's share of the sessions, taken before the block runs.
            await nursery.start(cluster.run, self._sup)
        nursery.start_soon(self._router.run, name="actors.router")
        nursery.start_soon(self._timer.run, name="actors.timer")
        nursery.start_soon(self._watch_store, name="actors.store-watch")
        nursery.start_soon(self._sweep_keys, name="actors.key-sweep")
        nursery.start_soon(self._report_backlog, name="actors.backlog")
        nursery.start_soon(
            self._health.run, self._store, self.config.status_interval, name="actors.heartbeat"
        )
        nursery.start_soon(self._control.run, name="actors.control")

    async def _sweep_keys(self) -> None:
        # Forget idempotency keys a retention window after their message
        # was processed, so the keys table does not grow without bound.
        retention = self.config.key_retention
        period = min(3600.0, max(1.0, retention / 4))
        store = self._store
        async for _ in periodic(period):
            before = self._clock.now() - retention
            while await store.sweep_keys(before, KEY_SWEEP_LIMIT) >= KEY_SWEEP_LIMIT:
                pass

    async def _report_backlog(self) -> None:
        # "backlog" events, only while someone subscribes to events().
        events = self._sup.events
        while True:
            await events.subscribed.wait()
            async for _ in periodic(self.config.status_interval):
                if not events.active:
                    break
                stats = self.statistics()
                self._sup.emit(
                    "backlog", pending=stats.pending, in_flight=stats.in_flight, dead=stats.dead
                )

    async def _watch_store(self) -> None:
        # A failure that no task waits for (a submitted ack) still stops the system.
        await self._store.failed.wait()
        failure = self._store.failure
        log.error("the database failed; stopping the system: %s", failure)
        raise StoreError(f"the database failed: {failure}") from failure

    def _begin_stop(self, grace: float) -> None:
        """Refuse sends and let the supervisor stop, running handlers ``grace`` seconds more.

        Synchronous, so a caller that is cancelled (the block's own tasks,
        as shutdown() cancels them) still begins it. A later call can only
        bring the deadline closer.
        """
        deadline = trio.current_time() + grace
        if self._stop_begun:
            self._sup.hasten(deadline)
            return
        self._stop_begun = True
        self._closed = True
        self._router.close()
        # No handler starts from this step on (the router's last batch still
        # commits and its senders are answered; its messages stay pending).
        self._sup.begin_stop()
        # Unhealthy from now on, for `actors health` in another process too.
        self._health.begin_stop(self._store, self.config.status_interval)
        if self._nursery is None:  # pragma: no cover - always set once running
            self._stop_done.set()
            return
        try:
            self._nursery.start_soon(self._stop, deadline, name="actors.stop")
        except RuntimeError:
            # The system's nursery is closing (the system failed): run_system
            # is cancelling everything already.
            self._stop_done.set()

    async def _stop(self, deadline: float) -> None:
        try:
            # The batch the router was filling commits, and its senders are
            # answered, before the handlers' grace is counted out.
            await self._router.finished.wait()
            await self._sup.stop(deadline)
        finally:
            self._stop_done.set()

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        # The block ended (normally, or cancelled by shutdown()): stop, unless
        # shutdown() began it already with its own grace, and wait for it.
        if not self._stop_begun:
            self._begin_stop(self.config.shutdown_timeout)
        await self._stop_done.wait()
        stats = self.statistics()
        log.info(
            "system on %r stopped: %d processed, %d pending left, %d dead",
            self.path,
            stats.processed,
            stats.pending + stats.in_flight,
            stats.dead,
        )
        nursery.cancel_scope.cancel()

    async def shutdown(self, grace: float) -> None:
        """Stop the system gracefully and end its ``async with`` block.

        At once: sends are refused (``SystemClosedError``; sends already
        made are committed and answered), no handler starts any more
        (messages handed to an actor but not started go back to pending,
        their attempt given back), and the code of the ``async with`` block
        is cancelled, every task in it, as if by a cancel scope around the
        block. Handlers already running get ``grace`` seconds to finish;
        their acknowledgements (and state, and outbox) commit as usual.
        Those still running then are cancelled: their messages go back to
        pending, the attempt counted, and run again at the next start. Then
        the store is closed and the ``async with`` block exits normally (no
        exception), unless something else failed.

        Returns once all of that is done. Called from inside the block (the
        usual signal-handling recipe, see docs/lifecycle.md), the caller is
        cancelled with the block; the stop goes on. Called from a handler
        (its hooks, or a task they started), it returns at once (the stop
        waits for that handler, which finishes and is acknowledged like any
        other running one). Idempotent: a later call waits for the same
        stop, and can only shorten the grace (``shutdown(0)`` cancels the
        running handlers now). Leaving the block on its own, or calling it
        after the system stopped, is fine.

        Raises:
          TypeError: ``grace`` is not a number.
          ValueError: ``grace`` is negative or NaN (``math.inf`` waits for
            the handlers without limit).
        """
        grace = check_number("grace", grace, minimum=0, maximum=math.inf)
        if not self._stopped.is_set():
            self._begin_stop(grace)
            if self._body is not None:
                self._body.cancel()
        if self._calling_actor() is not None:
            # A handler (or a task it started): waiting here would hold up
            # the stop it waits for.
            await trio.lowlevel.checkpoint()
            return
        await self._stopped.wait()

    async def _refuse(self) -> NoReturn:
        # A send refused because the system closes: if it closes because the
        # sender's own scope was cancelled (an outer timeout around
        # run_system, the body raising, shutdown() cancelling the block's
        # tasks), the send ends with that cancellation, as any checkpoint
        # would, and the scope catches it. Otherwise a group of
        # SystemClosedError escaped the timeout that ended the block, or
        # failed the block that shutdown() meant to end quietly.
        await trio.lowlevel.checkpoint_if_cancelled()
        raise SystemClosedError("the system is shutting down and accepts no more messages")

    @property
    def closed(self) -> bool:
        """True once the system began to shut down (sends are refused)."""
        return self._closed

    # -- sending ------------------------------------------------------------

    async def send(
        self,
        session_id: str,
        body: Any,
        *,
        delay: float | None = None,
        key: str | None = None,
    ) -> int:
        """Persist a message for ``session_id``; return its id once it is durable.

        ``body`` is any JSON-compatible value, or ``bytes``. The handler
        receives the JSON round trip of it (tuples arrive as lists, dict keys
        as strings). With ``delay`` (seconds), the message enters the
        session's queue that much later; it is on disk now.

        With ``key`` (an idempotency key, a str of up to 256 characters), a
        send whose session and key were sent before persists nothing and
        returns the first message's id, as long as that message is pending,
        in flight or dead, or was processed less than ``key_retention``
        seconds ago (an option of ``run_system``, one day by default). A
        producer that retries after a timeout causes no duplicate work.

        Raises:
          TypeError: ``session_id`` is not a str, ``body`` cannot be
            encoded, ``delay`` is not a number (a bool is not). Nothing is
            persisted.
          ValueError: ``session_id`` is empty, over 256 characters or
            contains NUL; ``delay`` is negative, not finite or over 10**9
            seconds; the encoded body is over ``max_message_bytes``
            (MessageTooLargeError). Nothing is persisted.
          SystemClosedError: the system is shutting down.
          StoreError: the database failed; the message was not acknowledged.

        If the calling task is cancelled while waiting, the message may or
        may not have been persisted (as with any request whose answer is lost).
        """
        if self._closed:
            await self._refuse()
        session_id = check_session_id(session_id)
        data = encode_body(body, self.config.max_message_bytes)
        if key is not None:
            key = check_key(key)
        now = self._clock.now()
        not_before = None
        if delay is not None:
            seconds = check_seconds("delay", delay)
            if seconds:
                not_before = now + seconds
        try:
            batch, index = self._router.add(session_id, data, now, not_before, key)
        except SystemClosedError:
            await self._refuse()
        await batch.wait()
        if batch.error is not None:
            await self._failed(batch)
        if batch.duplicates is not None:
            return batch.message_id(index)
        return batch.first_id + index

    async def ask(self, session_id: str, body: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Send ``body`` to ``session_id`` and wait for its handler's outcome.

        Returns what the handler returned for this message. If the handler
        raises (or outlives ``handler_timeout``), ``ask`` raises that
        exception; the message itself follows the usual retry policy, and
        a later attempt's outcome is not reported. A kill of the actor is
        not an outcome: ``ask`` waits for the next attempt. The message is
        durable like any other (``send`` semantics).

        If the process dies, the reply is lost with the asker; the message is
        processed after the restart, like any message. ``timeout`` (seconds,
        None for no limit) covers the whole call.

        Raises:
          AskTimeoutError (a TimeoutError): no outcome within ``timeout``.
            The message is still processed; its reply is dropped.
          DeadLetteredError: the message ran out of attempts without the
            handler raising (kills, crashes of the process).
          ActorsError: the message was deleted by ``abort`` or ``purge``
            before it ran.
          RuntimeError: called from ``session_id``'s own actor (its handler,
            its hooks, or a task they started), which would wait for itself.
          TypeError / ValueError / SystemClosedError / StoreError: as
            :meth:`send`; ``timeout`` is checked as ``delay`` is.
        """
        if self._closed:
            await self._refuse()
        session_id = check_session_id(session_id)
        self._check_not_own_actor(session_id)
        data = encode_body(body, self.config.max_message_bytes)
        seconds = None if timeout is None else check_seconds("timeout", timeout)
        reply = Reply()
        msg_id: int | None = None
        with trio.move_on_after(math.inf if seconds is None else seconds) as scope:
            try:
                try:
                    batch, index = self._router.add(
                        session_id, data, self._clock.now(), None, None, reply
                    )
                except SystemClosedError:
                    await self._refuse()
                await batch.wait()
                if batch.error is not None:
                    await self._failed(batch)
                msg_id = batch.message_id(index)
                if self._sup.early_replies:
                    self._take_early_reply(msg_id, reply)
                await reply.done.wait()
            finally:
                if not reply.done.is_set() and msg_id is not None:
                    self._sup.replies.pop(msg_id, None)
        if scope.cancelled_caught:
            raise _ask_timeout(session_id, timeout, msg_id)
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _take_early_reply(self, msg_id: int, reply: Reply) -> None:
        # (Another process answered before this ask learnt its message id.)
        outcome = self._sup.early_replies.pop(msg_id, None)
        if outcome is not None:
            self._sup.replies.pop(msg_id, None)
            settle(reply, msg_id, outcome)

    def _check_not_own_actor(self, session_id: str) -> None:
        actor = self._calling_actor()
        if actor is not None and actor.session_id == session_id:
            raise RuntimeError(
                f"ask() of session {session_id!r} from its own actor would wait for "
                "itself: the session runs one message at a time, and this one is "
                "running (send() it, or ask another session)"
            )

    async def send_many(
        self, items: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
    ) -> list[int]:
        """Persist many ``(session_id, body)`` messages in one transaction.

        An item may also be ``(session_id, body, key)``: an idempotency key
        as in :meth:`send` (None for none). All are validated first: if any
        is invalid, none is persisted and the error names its index.
        Returns the ids in the order given (a duplicate's id is the first
        message's). Raises as :meth:`send` does; TypeError also for an item
        that is not a tuple (or list).
        """
        if self._closed:
            await self._refuse()
        sessions, bodies, keys = _check_items(items, self.config.max_message_bytes)
        if not sessions:
            await trio.lowlevel.checkpoint()
            return []
        # One add: the items land in one open batch, contiguous.
        try:
            batch, first_index = self._router.add_many(sessions, bodies, self._clock.now(), keys)
        except SystemClosedError:
            await self._refuse()
        await batch.wait()
        if batch.error is not None:
            await self._failed(batch)
        if batch.duplicates is not None:
            return [batch.message_id(first_index + j) for j in range(len(sessions))]
        first = batch.first_id + first_index
        return list(range(first, first + len(sessions)))

    @staticmethod
    async def _failed(batch: Batch) -> NoReturn:
        error = batch.error
        if isinstance(error, SystemClosedError):
            await trio.lowlevel.checkpoint_if_cancelled()
            raise SystemClosedError(str(error))
        raise StoreError(
            f"message not acknowledged (it may or may not be on disk): {error}"
        ) from error

    # -- streams and other threads -------------------------------------------

    def subscribe(self, session_id: str, *, buffer: int = 16) -> Subscription[Any]:
        """Stream ``session_id``'s outputs: ``async for value in system.subscribe(s)``.

        Outputs are what the session's handler returns (other than None) and
        what it passes to ``ctx.emit(value)``, from the moment of this call,
        in order. With backpressure: while this subscriber's ``buffer`` is
        full, the session's actor waits (its handler's ``emit``, or the
        step after its return). Outputs are live, not durable: a message
        redelivered after a crash produces its outputs again.

        The iteration ends when the system stops. Close the subscription
        (``aclose()``, ``async with``, or just ``break`` and drop it) to
        stop holding the session back.

        Raises:
          TypeError / ValueError: an invalid ``session_id`` (as :meth:`send`);
            ``buffer`` not an int (TypeError) or not from 1 to 2**63 - 1.
        """
        session_id = check_session_id(session_id)
        return self._sup.outputs.subscribe(session_id, buffer)

    def events(self, *, buffer: int = 1000) -> Subscription[StatusEvent]:
        """Stream status events: ``async for event in system.events()``.

        Actors started, stopped and restarted, sessions suspended by the
        restart policy, messages dead-lettered, and every
        ``status_interval`` seconds a ``"backlog"`` snapshot (see
        StatusEvent). Never slows the system: if this subscriber's
        ``buffer`` is full, an event is dropped for it and counted in its
        ``dropped``. Ends when the system stops.

        Raises:
          TypeError / ValueError: ``buffer`` not an int, or not from 1 to
            2**63 - 1.
        """
        return self._sup.events.subscribe(buffer)

    def _close_streams(self) -> None:
        # The system stopped: end every subscription, and answer every ask
        # still waiting (its message stays pending for the next start).
        sup = self._sup
        sup.outputs.close()
        sup.events.close()
        replies, sup.replies = sup.replies, {}
        for msg_id, reply in replies.items():
            reply.set_error(
                SystemClosedError(
                    f"the system stopped before message {msg_id} was answered "
                    "(it stays pending for the next start)"
                )
            )

    def bridge(self) -> Bridge:
        """A thread-safe client for code outside the trio thread (see Bridge)."""
        if self._nursery is None:  # pragma: no cover - always set once running
            raise SystemClosedError("the system is not running")
        return Bridge(self, trio.lowlevel.current_trio_token(), self._nursery)

    # -- waiting and chaos ----------------------------------------------------

    async def drain(self) -> None:
        """Return once nothing is pending or in flight.

        Delayed messages and messages waiting for a retry count as pending;
        dead letters do not. Sends already made (even if their ``send()`` has
        not returned yet), and sends made while draining, are waited for too.

        Raises:
          RuntimeError: called from a session's actor (its handler, its
            hooks, or a task they started), which would wait for itself.
        """
        actor = self._calling_actor()
        if actor is not None:
            raise RuntimeError(
                f"drain() called from the actor of session {actor.session_id!r} would "
                "wait for its own message, and never return: call it outside handlers"
            )
        # Sends whose batch is committing count too: their messages enter
        # the outstanding count only once durable.
        await self._router.flushed()
        cluster = self._store.cluster
        if cluster is not None:
            await self._drain_cluster(cluster)
            return
        await self._sup.outstanding.wait_zero()

    async def _drain_cluster(self, cluster: Cluster) -> None:
        # The work is shared: what is outstanding is in the database. Read
        # again after each acknowledgement here, or a while after the last
        # read (another process's acks send no notice here).
        outstanding = self._sup.outstanding
        while True:
            counts = await cluster.refresh_counts()
            if counts.pending == 0 and counts.in_flight == 0:
                # The database may show an ack before its commit is reported
                # here (processed counted, asks answered): wait for that too.
                reported = trio.Event()
                self._store.after_commits(reported.set)
                await reported.wait()
                # An ack that rode with a claim is counted by its actor as
                # the claim returns, before the actor's next checkpoint: its
                # task was rescheduled no later than this one, so one
                # checkpoint here lets it run that far.
                await trio.lowlevel.checkpoint()
                return
            with trio.move_on_after(_DRAIN_POLL):
                await outstanding.wait_at_most(outstanding.value - 1)

    def _calling_actor(self) -> SessionActor | None:
        """The session actor whose task, or a task started inside it, calls (if any).

        Walks the calling task's parents (a handler may call from a nursery
        of its own); done by drain(), ask() and shutdown() only, not per
        message, and only while some actor runs.
        """
        tasks = self._sup.actor_tasks
        if not tasks:
            return None
        task: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        while task is not None:
            actor = tasks.get(task)
            if actor is not None:
                return actor
            nursery = task.parent_nursery
            task = nursery.parent_task if nursery is not None else None
        return None

    def kill(self, session_id: str) -> bool:
        """Crash ``session_id``'s actor now, mid-message if it is busy.

        The supervisor restarts it (restart policy) and its in-flight message
        goes back to the head of its queue, the attempt counted as failed.
        Returns whether an actor was running. On a cluster, a session run by
        another process is killed there: the request goes through the
        database (without waiting), and this returns True once it is sent.

        Raises:
          TypeError / ValueError: an invalid ``session_id``, as :meth:`send`.
        """
        session_id = check_session_id(session_id)
        cluster = self._store.cluster
        if cluster is not None and not cluster.owns(session_id):
            return cluster.kill_elsewhere(session_id)
        return self._sup.kill(session_id)

    # -- introspection ----------------------------------------------------

    def statistics(self) -> SystemStatistics:
        """A snapshot of the counts (see SystemStatistics)."""
        sup = self._sup
        cluster = self._store.cluster
        if cluster is not None:
            # The whole database's, as last read: at most a lease round old.
            counts = cluster.counts()
            pending, in_flight, dead = counts.pending, counts.in_flight, counts.dead
            processed = counts.processed
        else:
            in_flight = sup.in_flight()
            pending = max(sup.outstanding.value - in_flight, 0)
            dead, processed = sup.dead, sup.processed
        return SystemStatistics(
            pending=pending,
            in_flight=in_flight,
            dead=dead,
            processed=processed,
            failed_attempts=sup.failed_attempts,
            dead_lettered=sup.dead_lettered,
            active_actors=sup.active,
            waiting_sessions=sup.waiting,
            restarts=sup.restart_count,
            sends=self._router.sends,
            commits=self._store.statistics().transactions,
        )

    def now(self) -> float:
        """The system's clock: seconds since the epoch, as it stamps ``Message.enqueued_at``.

        It follows trio's clock (a ``MockClock`` in tests) from the wall
        time read when the system started, so ``system.now() -
        msg.enqueued_at`` is how long ago ``msg`` was sent, even if the
        system's wall clock jumped since (see docs/guarantees.md).
        """
        return self._clock.now()

    def add_handler_observer(self, observer: HandlerObserver) -> Callable[[], None]:
        """Call ``observer(message, seconds)`` after every successful handler call.

        ``message`` is the Message handled, ``seconds`` how long its handler
        ran (on trio's clock). It is called on the trio thread, in the
        session's actor, right after the handler returned and before its
        acknowledgement commits; not for a call that raised, timed out or
        was killed. The session waits for it: it must be a quick, plain
        function (metrics, counters; :mod:`actors.prometheus` is built on
        it). Several observers may be added; they are called in the order
        they were added. An exception from an observer is logged (its
        first one, with the traceback, on the ``actors.streams`` logger)
        and otherwise ignored: the message, the other observers and this
        one go on as before.

        Returns a function that removes this observer (calling it again
        does nothing). With no observer installed the runtime pays nothing
        for the hook.

        Raises:
          TypeError: ``observer`` is not callable.
        """
        return self._observers.add(observer)

    def _set_observer(self, hook: Callable[[Message, float], None] | None) -> None:
        # The supervisor calls one hook per handled message (None: none).
        self._sup.observer = hook

    def is_active(self, session_id: str) -> bool:
        """Whether ``session_id`` has a live actor right now.

        Raises:
          TypeError / ValueError: an invalid ``session_id``, as :meth:`send`.
        """
        return self._sup.is_live(check_session_id(session_id))

    def active_sessions(self) -> list[str]:
        """The sessions that have a live actor right now, sorted.

        Live as in :meth:`is_active`: running a handler, idle, or waiting to
        restart. As many as ``statistics().active_actors``.
        """
        return self._sup.live_sessions()

    def busy_sessions(self) -> list[str]:
        """The sessions whose actor holds a message in flight right now, sorted.

        In flight: claimed and not yet acknowledged, so its handler is about
        to run, is running, or has returned and the acknowledgement has not
        committed yet. As many as ``statistics().in_flight``. These are the
        sessions a :meth:`kill` would interrupt mid-message.
        """
        return self._sup.busy_sessions()

    def open_views(self) -> StoreViews:
        """Read-only views of this system's database, on a connection of their own.

        What ``actors status`` and ``actors sessions`` read (``StoreViews``:
        counts, sessions by depth, dead letters), consistent within one
        ``with views.snapshot():``. The open and the reads are synchronous
        and never wait for the system's writer: call this from any thread,
        e.g. a worker thread (``trio.to_thread.run_sync``) to keep the trio
        loop free. Close the views after use.

        Raises:
          StoreError: the database cannot be opened.
        """
        return open_views(self._target, self.config.busy_timeout)

    # -- dead letters ---------------------------------------------------------

    def dead_letters(
        self, session_id: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        """Dead letters, oldest first; only ``session_id``'s if given.

        A synchronous read through a separate read-only connection; pass
        ``limit`` when there may be very many.

        Raises:
          TypeError: ``session_id`` is not a str (or None), ``limit`` not
            an int (or None).
          ValueError: an invalid ``session_id``; ``limit`` negative or over
            2**63 - 1 (0 gives ``[]``).
          StoreError: the database cannot be read.
        """
        if session_id is not None:
            session_id = check_session_id(session_id)
        if limit is not None:
            limit = check_int("limit", limit)
        return self._store.dead_letters(session_id, limit)

    async def retry_dead(self, message_id: int | None = None) -> int:
        """Requeue one dead letter (or all) with fresh attempts; returns how many.

        A requeued message goes to the back of its session's queue.

        Raises:
          TypeError: ``message_id`` is not an int (a bool is not).
          ValueError: ``message_id`` is below 1 or over 2**63 - 1 (no
            message can have it).
          SystemClosedError: the system is shutting down.
          StoreError: the database failed.
        """
        if message_id is not None:
            message_id = check_message_id(message_id)
        self._check_open()
        requeued = await self._store.retry_dead(message_id)
        sup = self._sup
        sup.dead -= len(requeued)
        sup.outstanding.add(len(requeued))
        for session_id, seq in requeued:
            sup.ensure(session_id, seq)
        log.info(
            "retry_dead(%s): %d dead letter(s) requeued",
            "all" if message_id is None else message_id,
            len(requeued),
        )
        return len(requeued)

    async def abort(self, message_id: int) -> bool:
        """Delete a pending or dead message. Returns False if there is none.

        Raises:
          TypeError: ``message_id`` is not an int (a bool is not).
          ValueError: ``message_id`` is below 1 or over 2**63 - 1 (no
            message can have it); the message is in flight (a handler runs
            it now).
          SystemClosedError: the system is shutting down.
          StoreError: the database failed.
        """
        message_id = check_message_id(message_id)
        self._check_open()
        # Claimed on delivery but not started: taken from its actor, it may go.
        taken = bool(self._sup.unhand(message_id=message_id))
        found = await self._store.abort(message_id, taken)
        if found is None:
            return False
        state, session_id = found.state, found.session_id
        if state == MessageState.IN_FLIGHT:
            raise ValueError(f"message {message_id} is in flight and cannot be aborted now")
        log.info(
            "abort(%d): %s message of session %r deleted",
            message_id,
            "dead" if state == MessageState.DEAD else "pending",
            session_id,
        )
        reply = self._sup.replies.pop(message_id, None)
        if reply is not None:  # an ask waits for it: it will never run now
            reply.set_error(ActorsError(f"message {message_id} was aborted before it ran"))
        if state == MessageState.DEAD:
            self._sup.dead -= 1
        else:
            self._sup.outstanding.add(-1)
            self._sup.ensure(session_id)  # its successor may be ready now
        return True

    async def purge(
        self, *, session_id: str | None = None, dead: bool = False, older_than: float | None = None
    ) -> int:
        """Delete messages for good, never one in flight; returns how many.

        ``purge(session_id=s)`` deletes the session's pending messages
        (delayed and retry-waiting ones included) and its dead letters; a
        message its handler runs now is left to finish. ``purge(dead=True)``
        deletes dead letters, only ``session_id``'s if given, only those
        sent more than ``older_than`` seconds ago if given. Idempotency keys
        of deleted messages are forgotten.

        Raises:
          TypeError: ``session_id`` not a str, ``dead`` not a bool,
            ``older_than`` not a number.
          ValueError: neither ``session_id`` nor ``dead=True``; ``older_than``
            without ``dead=True``, negative, not finite or over 10**9; an
            invalid ``session_id``.
          SystemClosedError: the system is shutting down.
          StoreError: the database failed.
        """
        self._check_open()
        session_id, before = purge_scope(session_id, dead, older_than, self._clock.now())
        sup = self._sup

        def deleted(pending: int, dead_count: int, ids: list[int]) -> None:
            sup.dead -= dead_count
            sup.outstanding.add(-pending)
            if sup.replies:
                for msg_id in ids:
                    reply = sup.replies.pop(msg_id, None)
                    if reply is not None:  # an ask waits for it: it will never run now
                        reply.set_error(ActorsError(f"message {msg_id} was purged before it ran"))

        if session_id is not None and not dead:
            # Claimed on delivery but not started: back to pending, they may go.
            taken = sup.unhand(session_id=session_id)
            if taken:
                await self._store.release_many(taken)
        count = await purge_batches(self._store, session_id, dead, before, deleted)
        log.info(
            "purge(session_id=%r, dead=%s, older_than=%s): %d message(s) deleted",
            session_id,
            dead,
            older_than,
            count,
        )
        return count

    async def health(self, *, stall_after: float = 60.0) -> Health:
        """Whether the system makes progress (see Health).

        Unhealthy when a due message (pending and not waiting for a delay
        or a retry, or in flight) has waited more than ``stall_after``
        seconds and no message was acknowledged or dead-lettered within the
        last ``stall_after`` seconds; also once the system is shutting
        down. While work is outstanding, reads the oldest due message
        through the store (a scan of the queued messages).

        Raises:
          TypeError: ``stall_after`` is not a number.
          ValueError: ``stall_after`` is not > 0, not finite or over 10**9.
          StoreError: the database failed.
        """
        stall_after = check_seconds("stall_after", stall_after, positive=True)
        oldest = None
        if self._closed or not self._sup.outstanding.value:
            await trio.lowlevel.checkpoint()
        else:
            oldest = await self._store.oldest_due(self._clock.now())
        return self._health.check(stall_after, oldest, closed=self._closed)

    def _check_open(self) -> None:
        if self._closed:
            raise SystemClosedError("the system is shutting down")


def _check_items(
    items: Iterable[tuple[str, Any] | tuple[str, Any, str | None]], limit: int
) -> tuple[list[str], list[str | bytes], list[str | None] | None]:
    """``send_many``'s items, checked and encoded: (sessions, bodies, keys or None).

    Raises TypeError / ValueError as ``send`` does, naming the item's index.
    """
    sessions: list[str] = []
    bodies: list[str | bytes] = []
    keys: list[str | None] | None = None  # once an item has a key
    for i, item in enumerate(items):
        try:
            key = None
            if type(item) is tuple and len(item) == 2:
                session_id, body = item
            else:
                if not isinstance(item, tuple | list):
                    # A str or a dict would unpack into its characters or keys.
                    raise TypeError(
                        f"expected a (session_id, body) tuple, got {type(item).__name__}"
                    )
                session_id, body, *rest = item
                if len(rest) > 1:
                    raise ValueError(
                        f"expected (session_id, body) or (session_id, body, key), "
                        f"got {len(rest) + 2} values"
                    )
                if rest and rest[0] is not None:
                    key = check_key(rest[0])
            sessions.append(check_session_id(session_id))
            bodies.append(encode_body(body, limit))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"item {i}: {exc}") from None
        if key is not None:
            if keys is None:
                keys = [None] * i
            keys.append(key)
        elif keys is not None:
            keys.append(None)
    return sessions, bodies, keys


def _ask_timeout(session_id: str, timeout: float | None, msg_id: int | None) -> AskTimeoutError:
    where = (
        " (the message may or may not have been persisted: the timeout came first)"
        if msg_id is None
        else f" (message {msg_id} is still processed)"
    )
    return AskTimeoutError(f"no reply from session {session_id!r} within {timeout}s{where}")


@asynccontextmanager
async def _single_error() -> AsyncIterator[None]:
    """Raise one exception out of run_system where the nursery grouped one.

    The usual case is a single error (the user's, or the store's); a
    StoreError is raised alone even if senders raised their own copies.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        store_errors = [e for e in leaves if isinstance(e, StoreError)]
        if len(leaves) == 1:
            raise leaves[0]  # noqa: B904 - the leaf keeps its own cause
        if store_errors and len(store_errors) == len(leaves):
            raise store_errors[0]  # noqa: B904 - likewise
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterable[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
