"""The bridge: a running system, used from other threads and from asyncio.

Every call is carried to the trio thread with ``TrioToken.run_sync_soon``
and runs there as a task in the system's nursery; its outcome comes back
through a ``concurrent.futures.Future``. Blocking methods wait on that
future (from a plain thread); the ``*_async`` methods wrap it for asyncio
(``asyncio.wrap_future``), so an asyncio application's event loop keeps
running while the message is persisted.

Calls from the trio thread itself are refused: they would block the very
loop that has to answer them. Use the System's own methods there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs
import trio

from ._errors import SystemClosedError
from ._validate import check_seconds

if TYPE_CHECKING:
    from ._streams import Subscription

T = TypeVar("T")


class System(Protocol):
    """What a bridge calls of the running ``actors.System`` (which has these methods).

    A protocol, so that the bridge, which the system makes, does not import
    the system's module back.
    """

    @property
    def closed(self) -> bool: ...
    async def send(
        self, session_id: str, body: Any, *, delay: float | None = None, key: str | None = None
    ) -> int: ...
    async def send_many(
        self, items: Iterable[tuple[str, Any] | tuple[str, Any, str | None]]
    ) -> list[int]: ...
    async def ask(self, session_id: str, body: Any, timeout: float | None = None) -> Any: ...  # noqa: ASYNC109
    def subscribe(self, session_id: str, *, buffer: int = 16) -> Subscription[Any]: ...


@attrs.frozen
class BridgeStatistics:
    """Calls carried by one bridge since it was made."""

    calls: int  # calls handed to the trio thread
    running: int  # calls whose task has not finished yet


class Bridge:
    """Thread-safe client of a running :class:`System` (``system.bridge()``).

    From a thread::

        message_id = bridge.send("session-1", {"kind": "observation"})

    From an asyncio application (its loop runs in another thread)::

        message_id = await bridge.send_async("session-1", {"kind": "observation"})

    Each call is durable exactly as the System's own method is: when
    ``send`` returns, the message is on disk. A bridge is valid while its
    system runs; afterwards calls raise SystemClosedError.
    """

    def __init__(self, system: System, token: trio.lowlevel.TrioToken, nursery: trio.Nursery):
        self._system = system
        self._carrier = _Carrier(system, token, nursery)

    def statistics(self) -> BridgeStatistics:
        """Calls so far, and calls still running."""
        return self._carrier.statistics()

    # -- blocking calls (plain threads) ---------------------------------------

    def send(
        self,
        session_id: str,
        body: Any,
        *,
        delay: float | None = None,
        key: str | None = None,
        timeout: float | None = None,
    ) -> int:
        """``System.send`` from another thread; returns the id once durable.

        ``timeout`` bounds the wait here (``concurrent.futures.TimeoutError``);
        the send itself goes on, and may or may not commit. It is checked
        (as ``System.send`` checks ``delay``) before anything is sent.
        """
        self._carrier.refuse_trio_thread()
        timeout = _check_timeout(timeout)
        future = self._carrier.submit(
            lambda: self._system.send(session_id, body, delay=delay, key=key)
        )
        return future.result(timeout)

    def send_many(
        self,
        items: Iterable[tuple[str, Any] | tuple[str, Any, str | None]],
        *,
        timeout: float | None = None,
    ) -> list[int]:
        """``System.send_many`` from another thread: one transaction for all."""
        self._carrier.refuse_trio_thread()
        timeout = _check_timeout(timeout)
        batch = list(items)  # read here, in the caller's thread
        return self._carrier.submit(lambda: self._system.send_many(batch)).result(timeout)

    def ask(self, session_id: str, body: Any, *, timeout: float | None = None) -> Any:
        """``System.ask`` from another thread."""
        self._carrier.refuse_trio_thread()
        return self._carrier.submit(lambda: self._system.ask(session_id, body, timeout)).result()

    def subscribe(self, session_id: str, *, buffer: int = 16) -> BlockingSubscription:
        """``System.subscribe`` as a blocking iterator, for a consumer thread.

        ``for value in bridge.subscribe(s):`` ends when the system stops;
        ``close()`` it (or use ``with``) to stop earlier. Backpressure holds:
        a consumer that reads slowly slows the session.
        """
        return BlockingSubscription(self._carrier, self._subscribe(session_id, buffer))

    def _subscribe(self, session_id: str, buffer: int) -> Subscription[Any]:
        # Registered on the trio thread, before this returns.
        self._carrier.refuse_trio_thread()
        return self._carrier.submit(
            _sync_to_async(lambda: self._system.subscribe(session_id, buffer=buffer))
        ).result()

    # -- asyncio --------------------------------------------------------------

    def subscribe_async(self, session_id: str, *, buffer: int = 16) -> AsyncioSubscription:
        """``System.subscribe`` for an asyncio consumer in another thread.

        ``async for value in bridge.subscribe_async(s):`` in the asyncio
        application; the same semantics as :meth:`subscribe` (backpressure,
        ends when the system stops, ``close()`` to stop earlier). Creating it
        waits briefly for the trio thread to register the subscription.
        """
        return AsyncioSubscription(self._carrier, self._subscribe(session_id, buffer))

    async def send_async(
        self,
        session_id: str,
        body: Any,
        *,
        delay: float | None = None,
        key: str | None = None,
    ) -> int:
        """``System.send`` from an asyncio event loop in another thread."""
        future = self._carrier.submit(
            lambda: self._system.send(session_id, body, delay=delay, key=key)
        )
        return await asyncio.wrap_future(future)

    async def ask_async(self, session_id: str, body: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """``System.ask`` from an asyncio event loop in another thread."""
        future = self._carrier.submit(lambda: self._system.ask(session_id, body, timeout))
        return await asyncio.wrap_future(future)


class _Carrier:
    """Carries calls to the trio thread, as tasks in the system's nursery.

    One per bridge, shared with the subscriptions it made (they carry their
    steps the same way, counted in the bridge's statistics).
    """

    def __init__(self, system: System, token: trio.lowlevel.TrioToken, nursery: trio.Nursery):
        self._system = system
        self._token = token
        self._nursery = nursery
        self._lock = threading.Lock()
        self._calls = 0
        self._running = 0

    def statistics(self) -> BridgeStatistics:
        with self._lock:
            return BridgeStatistics(calls=self._calls, running=self._running)

    def refuse_trio_thread(self) -> None:
        """Raise RuntimeError in the system's own trio thread (a blocking call would hang it)."""
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return
        if token is self._token:
            raise RuntimeError(
                "Bridge blocking calls cannot run in the system's own trio thread "
                "(they would block the loop that answers them); await the System's methods"
            )

    def submit(
        self, call: Callable[[], Awaitable[T]], *, while_stopping: bool = False
    ) -> concurrent.futures.Future[T]:
        """Run ``call()`` as a task of the system; its outcome comes in the future.

        while_stopping: run even once the system began to stop, as long as
        its nursery takes tasks (a subscription's next output: handlers
        may still emit during the shutdown grace period).

        Raises:
          SystemClosedError: the trio run is over.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        system = self._system

        async def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = await call()
            except trio.Cancelled:
                future.set_exception(SystemClosedError("the system stopped during this call"))
                raise
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._running -= 1

        def start() -> None:
            if system.closed and not while_stopping:
                future.set_exception(SystemClosedError("the system is shutting down"))
                return
            try:
                self._nursery.start_soon(run, name="actors.bridge-call")
            except RuntimeError:  # the nursery closed
                future.set_exception(SystemClosedError("the system has stopped"))
                return
            with self._lock:
                self._running += 1

        with self._lock:
            self._calls += 1
        try:
            self._token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise SystemClosedError("the system has stopped") from None
        return future

    def take_buffered(self, subscription: Subscription[Any]) -> Any:
        """An output still buffered in ``subscription`` (the system stopped), or ``_END``."""
        taken: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def take() -> None:
            try:
                taken.set_result(subscription.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                taken.set_result(_END)

        try:
            self._token.run_sync_soon(take)  # on the trio thread, if it still runs
        except trio.RunFinishedError:
            take()  # the trio run is over: no other thread uses the channel now
        return taken.result()

    def close(self, subscription: Subscription[Any]) -> None:
        """Unregister ``subscription`` (from any thread)."""
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(subscription.close)


_END = object()  # BlockingSubscription: nothing more is buffered


def _check_timeout(timeout: float | None) -> float | None:
    # Here, in the caller's thread: a bad timeout must fail before the
    # send is submitted (it would go on, and the error come after it).
    return None if timeout is None else check_seconds("timeout", timeout)


def _sync_to_async(fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return fn()

    return call


class BlockingSubscription:
    """A session's outputs for a plain thread: ``for value in subscription``.

    The iteration goes on while the system stops (handlers may still emit
    during the shutdown grace period), gives the outputs still buffered once
    it has stopped (even after its trio run returned), then ends; it also
    ends after ``close()``. Iterating in the system's own trio thread raises
    RuntimeError, as every blocking bridge call does.
    """

    def __init__(self, carrier: _Carrier, subscription: Subscription[Any]) -> None:
        self._carrier = carrier
        self._sub = subscription

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._carrier.refuse_trio_thread()
        try:
            # submit() itself raises SystemClosedError once the trio run is over
            # (a consumer thread that outlives it).
            return self._carrier.submit(self._sub.__anext__, while_stopping=True).result()
        except StopAsyncIteration:
            raise StopIteration from None
        except SystemClosedError:
            pass
        # The system has stopped. Outputs it published before are still this
        # consumer's, as they are for an async subscriber: hand them out, then end.
        value = self._carrier.take_buffered(self._sub)
        if value is _END:
            raise StopIteration
        return value

    def close(self) -> None:
        """Unregister (from any thread)."""
        self._carrier.close(self._sub)

    def __enter__(self) -> BlockingSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncioSubscription:
    """A session's outputs for asyncio: ``async for value in subscription``.

    Each step is carried to the trio thread and awaited with
    ``asyncio.wrap_future``, so the asyncio loop runs on while it waits.
    """

    def __init__(self, carrier: _Carrier, subscription: Subscription[Any]) -> None:
        self._carrier = carrier
        self._sub = subscription

    def __aiter__(self) -> AsyncioSubscription:
        return self

    async def __anext__(self) -> Any:
        try:
            future = self._carrier.submit(self._sub.__anext__, while_stopping=True)
            return await asyncio.wrap_future(future)
        except SystemClosedError:
            pass
        # The system stopped: what it published, then the end.
        value = self._carrier.take_buffered(self._sub)
        if value is _END:
            raise StopAsyncIteration
        return value

    def close(self) -> None:
        """Unregister (from any thread)."""
        self._carrier.close(self._sub)

    async def __aenter__(self) -> AsyncioSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
