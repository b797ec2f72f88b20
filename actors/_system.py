"""``run_system`` and the :class:`System` facade that its ``async with`` yields."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._actor import actor_factory
from ._clock import Clock
from ._codec import check_session_id, encode_body
from ._config import Config, finite_delay
from ._errors import StoreError, SystemClosedError
from ._lock import DatabaseLock
from ._records import DeadLetter, SystemStatistics
from ._router import Batch, Router
from ._store import DEAD, IN_FLIGHT, Opened, Store, database_path
from ._supervisor import Supervisor
from ._timer import Timer


class System:
    """A running system. Get one from ``async with run_system(...) as system``.

    All methods must be called from the trio thread that runs the system.
    """

    def __init__(
        self,
        *,
        path: str,
        store: Store,
        opened: Opened,
        config: Config,
        handler: object,
        rng: random.Random | None,
    ) -> None:
        self.path = path
        self.config = config
        self._store = store
        self._clock = Clock()
        self._timer = Timer(store, self._clock)
        self._sup = Supervisor(
            system=self,
            store=store,
            clock=self._clock,
            config=config,
            factory=actor_factory(handler),
            timer=self._timer,
            pending=opened.pending,
            dead=opened.dead,
            rng=rng,
        )
        self._timer.supervisor = self._sup
        self._router = Router(store, self._sup, self._timer)
        self._closed = False
        self.recovered = opened.recovered

    # -- lifecycle (run_system) -------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._sup.run)
        nursery.start_soon(self._router.run, name="actors.router")
        nursery.start_soon(self._timer.run, name="actors.timer")
        nursery.start_soon(self._watch_store, name="actors.store-watch")

    async def _watch_store(self) -> None:
        # A failure that no task waits for (a submitted ack) still stops the system.
        await self._store.failed.wait()
        failure = self._store.failure
        raise StoreError(f"the database failed: {failure}") from failure

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        self._closed = True
        self._router.close()
        await self._router.finished.wait()
        await self._sup.stop(self.config.shutdown_timeout)
        nursery.cancel_scope.cancel()

    @property
    def closed(self) -> bool:
        """True once the system began to shut down (sends are refused)."""
        return self._closed

    # -- sending ------------------------------------------------------------

    async def send(self, session_id: str, body: Any, *, delay: float | None = None) -> int:
        """Persist a message for ``session_id``; return its id once it is durable.

        ``body`` is any JSON-compatible value, or ``bytes``. The handler
        receives the JSON round trip of it (tuples arrive as lists, dict keys
        as strings). With ``delay`` (seconds), the message enters the
        session's queue that much later; it is on disk now.

        Raises:
          TypeError: ``session_id`` is not a str, or ``body`` cannot be
            encoded. Nothing is persisted.
          ValueError: ``session_id`` is empty, over 256 characters or
            contains NUL; ``delay`` is negative or not finite; the encoded
            body is over ``max_message_bytes`` (MessageTooLargeError).
            Nothing is persisted.
          SystemClosedError: the system is shutting down.
          StoreError: the database failed; the message was not acknowledged.

        If the calling task is cancelled while waiting, the message may or
        may not have been persisted (as with any request whose answer is lost).
        """
        if self._closed:
            raise SystemClosedError("the system is shutting down and accepts no more messages")
        session_id = check_session_id(session_id)
        data = encode_body(body, self.config.max_message_bytes)
        now = self._clock.now()
        seconds = finite_delay(delay)
        batch, index = self._router.add(session_id, data, now, now + seconds if seconds else None)
        await batch.wait()
        self._check(batch)
        return batch.first_id + index

    async def send_many(self, items: Iterable[tuple[str, Any]]) -> list[int]:
        """Persist many ``(session_id, body)`` messages in one transaction.

        All are validated first: if any is invalid, none is persisted and the
        error names its index. Returns the ids in the order given.
        Raises as :meth:`send` does.
        """
        if self._closed:
            raise SystemClosedError("the system is shutting down and accepts no more messages")
        encoded: list[tuple[str, str | bytes]] = []
        limit = self.config.max_message_bytes
        for i, item in enumerate(items):
            try:
                session_id, body = item
                encoded.append((check_session_id(session_id), encode_body(body, limit)))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"item {i}: {exc}") from None
        if not encoded:
            await trio.lowlevel.checkpoint()
            return []
        now = self._clock.now()
        add = self._router.add
        # No checkpoint between the adds: they all land in one open batch.
        batch, first_index = add(encoded[0][0], encoded[0][1], now, None)
        for session_id, data in encoded[1:]:
            add(session_id, data, now, None)
        await batch.wait()
        self._check(batch)
        first = batch.first_id + first_index
        return list(range(first, first + len(encoded)))

    @staticmethod
    def _check(batch: Batch) -> None:
        if batch.error is not None:
            if isinstance(batch.error, SystemClosedError):
                raise SystemClosedError(str(batch.error))
            raise StoreError(
                f"message not acknowledged (it may or may not be on disk): {batch.error}"
            ) from batch.error

    # -- waiting and chaos ----------------------------------------------------

    async def drain(self) -> None:
        """Return once nothing is pending or in flight.

        Delayed messages and messages waiting for a retry count as pending;
        dead letters do not. Sends made while draining are waited for too.
        """
        await self._sup.outstanding.wait_zero()

    def kill(self, session_id: str) -> bool:
        """Crash ``session_id``'s actor now, mid-message if it is busy.

        The supervisor restarts it (restart policy) and its in-flight message
        goes back to the head of its queue, the attempt counted as failed.
        Returns whether an actor was running.
        """
        return self._sup.kill(session_id)

    # -- introspection ----------------------------------------------------

    def statistics(self) -> SystemStatistics:
        """A snapshot of the counts (see SystemStatistics)."""
        sup = self._sup
        in_flight = sup.in_flight()
        return SystemStatistics(
            pending=max(sup.outstanding.value - in_flight, 0),
            in_flight=in_flight,
            dead=sup.dead,
            processed=sup.processed,
            failed_attempts=sup.failed_attempts,
            dead_lettered=sup.dead_lettered,
            active_actors=sup.active,
            waiting_sessions=sup.waiting,
            restarts=sup.restart_count,
            sends=self._router.sends,
            commits=self._store.statistics().transactions,
        )

    def is_active(self, session_id: str) -> bool:
        """Whether ``session_id`` has a live actor right now."""
        return self._sup.is_live(session_id)

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

    # -- dead letters ---------------------------------------------------------

    def dead_letters(
        self, session_id: str | None = None, *, limit: int | None = None
    ) -> list[DeadLetter]:
        """Dead letters, oldest first; only ``session_id``'s if given.

        A synchronous read through a separate read-only connection; pass
        ``limit`` when there may be very many.
        """
        if session_id is not None:
            session_id = check_session_id(session_id)
        return self._store.dead_letters(session_id, limit)

    async def retry_dead(self, message_id: int | None = None) -> int:
        """Requeue one dead letter (or all) with fresh attempts; returns how many.

        A requeued message goes to the back of its session's queue.
        """
        self._check_open()
        requeued: list[tuple[str, int]] = await self._store.call(
            self._store.op_retry_dead, message_id
        )
        sup = self._sup
        sup.dead -= len(requeued)
        sup.outstanding.add(len(requeued))
        for session_id, seq in requeued:
            sup.ensure(session_id, seq)
        return len(requeued)

    async def abort(self, message_id: int) -> bool:
        """Delete a pending or dead message. Returns False if there is none.

        Raises:
          ValueError: the message is in flight (a handler runs it now).
        """
        self._check_open()
        found = await self._store.call(self._store.op_abort, message_id)
        if found is None:
            return False
        state, session_id = found
        if state == IN_FLIGHT:
            raise ValueError(f"message {message_id} is in flight and cannot be aborted now")
        if state == DEAD:
            self._sup.dead -= 1
        else:
            self._sup.outstanding.add(-1)
            self._sup.ensure(session_id)  # its successor may be ready now
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise SystemClosedError("the system is shutting down")


@asynccontextmanager
async def run_system(
    path: str | os.PathLike[str] = "actors.db",
    *,
    handler: object,
    rng: random.Random | None = None,
    **options: Any,
) -> AsyncIterator[System]:
    """Run a durable actor system on the SQLite database at ``path``.

    ``handler`` is ``async def handler(ctx, msg)`` or an :class:`Actor`
    subclass. ``options`` are those of :class:`Config` (``max_attempts``,
    ``handler_timeout``, ``idle_timeout``, ``max_active``, ...). ``rng``
    seeds retry jitter, for reproducible tests.

    On entry the database is opened (created if missing), locked for this
    system, and recovered: messages a dead process left in flight go back to
    pending at once, and sessions with work get actors, oldest work first.
    Leaving the block stops gracefully: sends are refused, running handlers
    get ``shutdown_timeout`` seconds, then are cancelled; unfinished
    messages stay pending for the next start.

    Raises:
      TypeError / ValueError: bad ``handler``, path or options (before
        anything is opened).
      DatabaseInUseError: another running system owns the database.
      StoreError: the database cannot be opened, or failed while running.
    """
    config = Config.from_options(options)
    actor_factory(handler)  # validate before touching the file
    db_path = database_path(path)
    lock = DatabaseLock(db_path)
    try:
        lock.acquire()
    except OSError as exc:
        raise StoreError(f"cannot lock database {db_path!r}: {exc}") from exc
    try:
        store, opened = await Store.open(
            db_path, durability=config.durability, busy_timeout=config.busy_timeout
        )
        try:
            async with _single_error(), trio.open_nursery() as nursery:
                system = System(
                    path=db_path,
                    store=store,
                    opened=opened,
                    config=config,
                    handler=handler,
                    rng=rng,
                )
                await system._start(nursery)
                try:
                    yield system
                except BaseException:
                    system._closed = True
                    nursery.cancel_scope.cancel()
                    raise
                await system._shutdown(nursery)
        finally:
            await store.aclose()
    finally:
        lock.release()


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
