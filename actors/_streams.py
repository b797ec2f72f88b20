"""Live streams out of a running system: a session's outputs, status events, handler observers.

Both are built on trio memory channels, not async generators (an async
generator must not yield inside a nursery or cancel scope). A
:class:`Subscription` is registered the moment it is created, so nothing
published after ``subscribe()`` / ``events()`` returns is missed, and it
unregisters itself when it is closed, when its ``async with`` ends, or when
it is garbage collected (a ``break`` out of ``async for`` drops the last
reference; collected in another thread, it is closed in the trio thread),
so an abandoned subscriber never holds anything up for long. The hubs hold
the events subscriptions weakly for that reason.

The two hubs differ in what a slow consumer does:

* :class:`Outputs` (``system.subscribe``) applies backpressure: publishing
  waits while a subscriber's buffer is full, so the session's actor slows
  to the pace of its consumer.
* :class:`Events` (``system.events``) never blocks the runtime: an event
  that finds a subscriber's buffer full is dropped for that subscriber and
  counted in its ``dropped``.

:class:`HandlerObservers` (``system.add_handler_observer``) are plain
functions called in the actor's task after each successful handler call,
for metrics: no channel, nothing buffered.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import attrs
import trio

from ._records import Message
from ._validate import check_int

log = logging.getLogger("actors.streams")

T = TypeVar("T")

EventKind = Literal[
    "actor_started",
    "actor_stopped",
    "actor_restarted",
    "session_suspended",
    "dead_lettered",
    "backlog",
]


@attrs.frozen
class StatusEvent:
    """One thing that happened in a running system (``System.events()``).

    Attributes:
      kind: ``"actor_started"``, ``"actor_stopped"`` (it passivated, yielded
        its slot, the system stopped, or its handler raised ``Reject`` and
        a fresh instance takes the next message; ``detail`` says which),
        ``"actor_restarted"`` (after a crash; ``detail`` is the error),
        ``"session_suspended"`` (the restart policy holds the session for
        ``delay`` seconds), ``"dead_lettered"`` (``message_id`` moved to dead
        letters; ``detail`` is the reason) or ``"backlog"`` (a periodic
        snapshot: ``pending``, ``in_flight``, ``dead``).
      at: when it happened, seconds since the epoch.
      session_id: the session concerned, or None for ``"backlog"``.
      message_id: the message concerned, if any.
      detail: a short human-readable explanation ("" if none).
      delay: seconds before the restart, for ``"actor_restarted"`` and
        ``"session_suspended"``.
      pending, in_flight, dead: counts, for ``"backlog"``.
    """

    kind: EventKind
    at: float
    session_id: str | None = None
    message_id: int | None = None
    detail: str = ""
    delay: float | None = None
    pending: int | None = None
    in_flight: int | None = None
    dead: int | None = None


@attrs.frozen
class SubscriptionStatistics:
    """One subscription right now."""

    buffered: int  # items waiting to be read
    buffer_size: int
    dropped: int  # events dropped because the buffer was full (events only)
    closed: bool


class Subscription(trio.abc.ReceiveChannel[T]):
    """A live stream, as a trio receive channel (``trio.abc.ReceiveChannel``).

    ``await receive()`` waits for the next item and raises
    ``trio.EndOfChannel`` once the system stopped and the buffer is empty
    (``trio.ClosedResourceError`` once this subscription was closed).
    ``async for item in subscription`` ends at either. ``aclose()`` (or
    leaving ``async with``) unregisters it at once. There is no ``clone()``:
    a subscription is one consumer's place in the stream (subscribe again
    for another).
    """

    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[T],
        unregister: Callable[[], None],
        buffer_size: int,
    ) -> None:
        self._receive = receive
        self._unregister: Callable[[], None] | None = unregister
        self._buffer_size = buffer_size
        self.dropped = 0  # maintained by the Events hub
        # The run the hubs live in: a subscription collected in another thread
        # (a BlockingSubscription its consumer thread dropped) is closed there.
        self._token = _current_token()

    async def receive(self) -> T:
        """The next item, waiting for it.

        Raises:
          trio.EndOfChannel: the stream ended (the system stopped) and
            every buffered item was received.
          trio.ClosedResourceError: this subscription was closed.
        """
        return await self._receive.receive()

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        # (Not ReceiveChannel's: closing the subscription ends the iteration too.)
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def receive_nowait(self) -> T:
        """The next buffered item, or raise ``trio.WouldBlock``.

        Raises ``trio.EndOfChannel`` once the stream ended and is empty.
        """
        return self._receive.receive_nowait()

    def close(self) -> None:
        """Unregister and stop the iteration (idempotent)."""
        unregister, self._unregister = self._unregister, None
        if unregister is not None:
            unregister()
            self._receive.close()

    async def aclose(self) -> None:
        """As :meth:`close`, with a checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A consumer that broke out of its loop without closing.
        if self._unregister is None:
            return
        if self._token is None or _current_token() is self._token:
            self.close()
        else:
            # Not the trio thread: the hubs and channels may only be touched
            # there (closing wakes an actor waiting for room). Once the run is
            # over, there is nothing left to release.
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self.close)

    def statistics(self) -> SubscriptionStatistics:
        """Buffered items, buffer size, dropped events, and whether it is closed."""
        stats = self._receive.statistics()
        return SubscriptionStatistics(
            buffered=stats.current_buffer_used,
            buffer_size=self._buffer_size,
            dropped=self.dropped,
            closed=self._unregister is None,
        )


def _current_token() -> trio.lowlevel.TrioToken | None:
    try:
        return trio.lowlevel.current_trio_token()
    except RuntimeError:  # not in a trio thread
        return None


def _check_buffer(buffer: int) -> int:
    # Any size trio takes: the channel allocates per item buffered, not per slot.
    return check_int("buffer", buffer, minimum=1)


@attrs.frozen
class OutputsStatistics:
    """The outputs hub right now."""

    sessions: int  # sessions with at least one subscriber
    subscribers: int
    published: int  # outputs handed to subscribers since start


class Outputs:
    """Each session's subscribers (``System.subscribe``), with backpressure.

    Invariant: ``_subs`` holds only sessions with at least one open
    subscriber, so ``publish`` costs one dict lookup when nobody listens.

    In a cluster (a store shared by several processes), ``remote`` holds
    the sessions that subscribers in other processes listen to, and
    ``forward`` takes their outputs there (without waiting: there is no
    backpressure across processes); ``watch`` is told when this process's
    first subscriber of a session comes, and after its last one left.
    """

    def __init__(self) -> None:
        self._subs: dict[str, list[trio.MemorySendChannel[Any]]] = {}
        self._closed = False
        self.published = 0
        self.remote: frozenset[str] = frozenset()
        self.forward: Callable[[str, Any], None] = lambda session_id, value: None
        self.watch: Callable[[str, bool], None] | None = None

    def subscribe(self, session_id: str, buffer: int) -> Subscription[Any]:
        buffer = _check_buffer(buffer)
        send, receive = trio.open_memory_channel[Any](buffer)
        if self._closed:
            send.close()
        else:
            if self.watch is not None and session_id not in self._subs:
                self.watch(session_id, True)
            self._subs.setdefault(session_id, []).append(send)

        def unregister() -> None:
            self._remove(session_id, send)

        return Subscription(receive, unregister, buffer)

    def _remove(self, session_id: str, send: trio.MemorySendChannel[Any]) -> None:
        channels = self._subs.get(session_id)
        if channels is not None and send in channels:
            channels.remove(send)
            if not channels:
                del self._subs[session_id]
                if self.watch is not None and not self._closed:
                    self.watch(session_id, False)
        send.close()

    def listening(self, session_id: str) -> bool:
        """Whether ``session_id`` has a subscriber (here, or in another process)."""
        return session_id in self._subs or session_id in self.remote

    async def publish(self, session_id: str, value: Any) -> None:
        """Give ``value`` to each of the session's subscribers, waiting while one is full."""
        if session_id in self.remote:
            self.forward(session_id, value)
        await self.publish_here(session_id, value)

    async def publish_here(self, session_id: str, value: Any) -> None:
        """Give ``value`` to this process's subscribers of the session (as publish)."""
        channels = self._subs.get(session_id)
        if not channels:
            await trio.lowlevel.checkpoint()
            return
        for send in list(channels):
            try:
                await send.send(value)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._remove(session_id, send)  # its consumer went away
            else:
                self.published += 1

    def close(self) -> None:
        """End every subscription (the system stops)."""
        self._closed = True
        for channels in self._subs.values():
            for send in channels:
                send.close()
        self._subs.clear()

    def statistics(self) -> OutputsStatistics:
        """Sessions listened to, subscribers, outputs published."""
        return OutputsStatistics(
            sessions=len(self._subs),
            subscribers=sum(len(c) for c in self._subs.values()),
            published=self.published,
        )


@attrs.frozen
class EventsStatistics:
    """The events hub right now."""

    subscribers: int
    emitted: int  # events emitted while someone listened
    dropped: int  # deliveries dropped because a subscriber's buffer was full


class Events:
    """Subscribers to status events (``System.events``); never blocks the emitter.

    Invariant: ``active`` is true exactly while someone subscribes, so the
    runtime builds no event when nobody listens.
    """

    def __init__(self) -> None:
        # (channel, subscription): weakly, so that an abandoned subscription
        # is collected, and unregisters itself, as an output one does.
        self._subs: list[
            tuple[trio.MemorySendChannel[StatusEvent], weakref.ref[Subscription[Any]]]
        ] = []
        self._closed = False
        self.active = False
        self.subscribed = trio.Event()  # set while someone subscribes
        self.emitted = 0
        self.dropped = 0

    def subscribe(self, buffer: int) -> Subscription[StatusEvent]:
        buffer = _check_buffer(buffer)
        send, receive = trio.open_memory_channel[StatusEvent](buffer)
        entry: list[Any] = []

        def unregister() -> None:
            if entry and entry[0] in self._subs:
                self._subs.remove(entry[0])
                self.active = bool(self._subs)
                if not self.active:
                    self.subscribed = trio.Event()
            send.close()

        sub: Subscription[StatusEvent] = Subscription(receive, unregister, buffer)
        if self._closed:
            send.close()
        else:
            entry.append((send, weakref.ref(sub)))
            self._subs.append(entry[0])
            self.active = True
            self.subscribed.set()
        return sub

    def emit(self, event: StatusEvent) -> None:
        """Offer ``event`` to every subscriber; a full one misses it (counted)."""
        self.emitted += 1
        for send, ref in list(self._subs):
            try:
                send.send_nowait(event)
            except trio.WouldBlock:
                sub = ref()
                if sub is not None:
                    if not sub.dropped:
                        log.warning(
                            "an events() subscriber's buffer is full: events are dropped "
                            "for it (counted in its statistics().dropped; read faster or "
                            "use a larger buffer)"
                        )
                    sub.dropped += 1
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                sub = ref()
                if sub is not None:
                    sub.close()

    def close(self) -> None:
        """End every subscription (the system stops)."""
        self._closed = True
        for send, _sub in self._subs:
            send.close()
        self._subs.clear()
        self.active = False

    def statistics(self) -> EventsStatistics:
        """Subscribers, events emitted and deliveries dropped."""
        return EventsStatistics(
            subscribers=len(self._subs), emitted=self.emitted, dropped=self.dropped
        )


HandlerObserver = Callable[[Message, float], object]
"""``observer(message, seconds)`` after a successful handler call (System.add_handler_observer)."""


@attrs.frozen
class ObserversStatistics:
    """The handler observers right now."""

    observers: int  # installed
    errors: int  # calls of an observer that raised, since start


class _Entry:
    """One installed observer (by identity: the same callable may be added twice)."""

    __slots__ = ("failed", "observer")

    def __init__(self, observer: HandlerObserver) -> None:
        self.observer = observer
        self.failed = False  # its first error was logged


class HandlerObservers:
    """The observers of successful handler calls (``System.add_handler_observer``).

    ``changed(hook)`` is called whenever the set of observers changes:
    ``hook`` is None while there is none (the runtime then pays one test
    per message), else one function that calls every observer, in the
    order they were added. An observer that raises is logged once (its
    first error, with the traceback) and counted; the message, the other
    observers and the observer itself go on as before.
    """

    def __init__(self, changed: Callable[[Callable[[Message, float], None] | None], None]) -> None:
        self._changed = changed
        self._entries: tuple[
            _Entry, ...
        ] = ()  # replaced, never mutated: a call iterates a snapshot
        self.errors = 0

    def add(self, observer: HandlerObserver) -> Callable[[], None]:
        """Install ``observer``; returns the function that removes it (idempotent).

        Raises:
          TypeError: ``observer`` is not callable.
        """
        if not callable(observer):
            raise TypeError(f"observer must be callable, got {type(observer).__name__}")
        entry = _Entry(observer)
        self._entries = (*self._entries, entry)
        self._changed(self._call)

        def remove() -> None:
            if any(e is entry for e in self._entries):
                self._entries = tuple(e for e in self._entries if e is not entry)
                self._changed(self._call if self._entries else None)

        return remove

    def _call(self, msg: Message, seconds: float) -> None:
        for entry in self._entries:
            try:
                entry.observer(msg, seconds)
            except Exception:
                self.errors += 1
                if not entry.failed:
                    entry.failed = True
                    log.exception(
                        "handler observer %r raised; the message is processed as usual"
                        " (later errors of this observer are counted, not logged)",
                        entry.observer,
                    )

    def statistics(self) -> ObserversStatistics:
        """Observers installed, and their errors since start."""
        return ObserversStatistics(observers=len(self._entries), errors=self.errors)
