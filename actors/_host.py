"""What a session actor runs and what it sees of its host: the actor's side of the supervisor.

``Behaviour`` is the user's handler made runnable (``actor_factory``);
``ActorHost`` the protocol of what an actor may read, ask and tell of the
supervisor that hosts it. The protocols are generic in the actor's type,
so this module does not import the actor's (``ActorHost[SessionActor]``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import attrs
import trio

from ._clock import Clock
from ._config import Config
from ._failure import FailureText
from ._gauge import Gauge
from ._phases import Exit
from ._records import Message
from ._reply import Reply
from ._session import SessionData
from ._streams import Outputs
from ._watchdog import IdleWatch, Watchdog
from .store import Store

A = TypeVar("A")
A_co = TypeVar("A_co", covariant=True)


class Instance(Protocol):
    """One incarnation of the user's actor (an ``actors.Actor``)."""

    async def started(self, ctx: Any) -> None: ...
    async def handle(self, ctx: Any, msg: Message) -> Any: ...
    async def handle_batch(self, ctx: Any, msgs: list[Message]) -> Any: ...
    async def stopped(self, ctx: Any) -> None: ...


@attrs.frozen
class Behaviour:
    """What the session actors run, made from ``run_system``'s handler (``actor_factory``).

    Attributes:
      new_instance: builds a fresh instance for each incarnation.
      loads_state_at_start: the instance has its own ``started`` hook, which
        may read ``ctx.state``: the state is loaded before it (otherwise
        with the first claim, in the same transaction).
      function: a function handler, called directly with ``(ctx, msg)``
        instead of through its instance's ``handle`` (one frame fewer per
        message); with ``max_batch``, with ``(ctx, msgs)``.
      max_batch: 0 for a handler of one message at a time; else the most
        messages a batched handler (``actors.batched``, or an actor's
        ``handle_batch``) takes at once.
      stops_quietly: the instance has no ``stopped`` hook of its own: an
        idle actor may be retired at once, its slot given to another
        session (Supervisor.evict).
    """

    new_instance: Callable[[], Instance]
    loads_state_at_start: bool
    function: Callable[[Any, Any], Awaitable[Any]] | None
    max_batch: int = 0
    stops_quietly: bool = False


class Waiters(Protocol):
    """The line of sessions waiting for a slot, as an actor sees it."""

    @property
    def has_waiters(self) -> bool: ...  # some session with work waits for a slot


class Isolating(Protocol[A_co]):
    """The isolation of crash suspects, as an actor sees it."""

    @property
    def holder(self) -> A_co | None: ...  # the actor running a suspect alone


class ActorHost(Protocol[A]):
    """What a session actor may read, ask and tell of its supervisor.

    Read: the options, the clock, the store, whether the system stops,
    whether others wait for a slot (``line``), who runs alone
    (``isolation``), and the objects an
    actor reports to on its hot path (the busy count, the deadline
    watches, the idle set, the replies and subscribers). Ask: a context,
    a restart delay, a retry delay, isolation, leave. Tell: what happened
    (started, acked, sent, dead-lettered, failed, rejected).
    """

    config: Config
    clock: Clock
    store: Store
    behaviour: Behaviour
    busy: Gauge  # actors holding a claimed message: follows the actor's in_flight
    watchdog: Watchdog
    idle_watch: IdleWatch
    idle_actors: set[A]  # parked actors (an idle one leaves first for a waiter)
    actor_tasks: dict[trio.lowlevel.Task, A]
    outputs: Outputs
    observer: Callable[[Message, float], None] | None
    stopping: bool
    # Bound once (a serving period reads them; a bound method made per
    # period is an object that lives as long as the actor).
    acks_committed: Callable[[tuple[int, list[tuple[str, int]] | None]], None]
    trio_time: Callable[[], float]

    # Read per message, so the objects themselves: a property of the host's
    # that asked them would be one more call each time.
    @property
    def line(self) -> Waiters: ...
    @property
    def isolation(self) -> Isolating[A]: ...
    @property
    def replies(self) -> Mapping[int, Reply]: ...  # message ids an ask() waits for
    @property
    def remote_asks(self) -> Mapping[int, str]: ...  # ...an ask() of another process waits for
    def new_context(self, data: SessionData) -> Any: ...
    def retry_delay(self, attempt: int) -> float: ...
    def on_restart(
        self, actor: A, failure: BaseException, summary: str | None = None
    ) -> tuple[float, bool]: ...
    async def isolate(self, actor: A) -> None: ...
    def end_isolation(self, actor: A) -> None: ...
    async def wait_isolation(self, actor: A) -> None: ...
    def retire(self, actor: A, outcome: Exit, task: trio.lowlevel.Task | None = None) -> bool: ...
    def successor(self, task: trio.lowlevel.Task) -> A | None: ...
    def session_context(self) -> contextvars.Context: ...
    def forget(self, actor: A) -> None: ...
    def on_actor_started(self, actor: A) -> None: ...
    def on_acked(self, count: int = 1) -> None: ...
    def on_acks_committed(self, result: tuple[int, list[tuple[str, int]] | None]) -> None: ...
    def on_sent(self, sent: list[tuple[str, int]]) -> None: ...
    def on_dead_lettered(
        self, session_id: str, count: int, ids: tuple[int, ...] = (), reason: str = ""
    ) -> None: ...
    def on_rejected(self, actor: A) -> None: ...
    def answer(self, msg_id: int, result: object) -> None: ...
    def on_attempt_failed(
        self,
        session_id: str,
        msg: Message,
        failure: BaseException,
        dead: bool,
        text: FailureText | None = None,
        answer: bool = True,
    ) -> None: ...
