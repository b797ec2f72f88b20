"""A supervisor, its actors, router and timer on a ``MemoryStore``, without ``run_system``.

``running(handler, store, **options)`` builds what ``System`` builds around
a store (a ``Supervisor`` with a ``Config``, the handler's ``Behaviour``, a
context per incarnation; the ``Router`` and the ``Timer``) and runs their
tasks in a nursery, so that unit tests drive the runtime through the fake
store's holds and trio's ``MockClock``. ``PhaseLog`` records every phase
change of every session actor (``SessionActor._to`` wrapped).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from memstore import MemoryStore, Row

from actors._actor import SessionActor
from actors._clock import Clock
from actors._codec import encode_body
from actors._config import Config
from actors._context import Context, actor_factory
from actors._phases import Phase
from actors._router import Router
from actors._supervisor import Supervisor
from actors.store import MessageState


class PhaseLog:
    """Every phase change of every session actor, in order.

    ``changes`` holds (session, actor number, old phase, new phase, trio
    time); actors are numbered in the order they first changed phase.
    ``when(phase, action)`` runs ``action(actor)`` as an actor enters
    ``phase`` (synchronously, before the actor's next await): a kill, a
    send, a stop at an exact point of the state machine.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.changes: list[tuple[str, int, Phase, Phase, float]] = []
        self._actors: list[SessionActor] = []  # (kept: an id() is not reused meanwhile)
        # [phase, session or None, action, entries to go]
        self._hooks: list[list[Any]] = []
        original = SessionActor._to
        log = self

        def recorded(actor: SessionActor, phase: Phase) -> None:
            old = actor.phase
            original(actor, phase)  # (raises TransitionError on an illegal change)
            log._record(actor, old, phase)

        monkeypatch.setattr(SessionActor, "_to", recorded)

    def when(
        self,
        phase: Phase,
        action: Callable[[SessionActor], object],
        session_id: str | None = None,
        nth: int = 1,
    ) -> None:
        """Run ``action(actor)`` the ``nth`` time from now an actor (of ``session_id``)
        enters ``phase``; once."""
        self._hooks.append([phase, session_id, action, nth])

    def _record(self, actor: SessionActor, old: Phase, new: Phase) -> None:
        number = next((n for n, known in enumerate(self._actors) if known is actor), None)
        if number is None:
            number = len(self._actors)
            self._actors.append(actor)
        self.changes.append((actor.session_id, number, old, new, trio.current_time()))
        for hook in list(self._hooks):
            phase, session_id, action, _ = hook
            if phase is new and session_id in (None, actor.session_id):
                hook[3] -= 1
                if hook[3] == 0:
                    self._hooks.remove(hook)
                    action(actor)

    def times(self, session_id: str, phase: Phase) -> list[float]:
        """When actors of ``session_id`` entered ``phase`` (trio time)."""
        return [t for s, _, _, new, t in self.changes if s == session_id and new is phase]

    def actors(self, session_id: str) -> list[list[str]]:
        """The phases each actor of ``session_id`` went through, from ``new``: a list each."""
        paths: dict[int, list[str]] = {}
        for session, number, old, new, _ in self.changes:
            if session == session_id:
                paths.setdefault(number, [old.value]).append(new.value)
        return list(paths.values())

    def path(self, session_id: str) -> list[str]:
        """Every phase the actors of ``session_id`` went through, one actor after another."""
        return [phase for path in self.actors(session_id) for phase in path]

    def clear(self) -> None:
        """Forget what was recorded (a test's set-up)."""
        self.changes.clear()


class Rig:
    """A running supervisor on a MemoryStore (see the module); made by :func:`running`."""

    def __init__(self, store: MemoryStore, config: Config, handler: object) -> None:
        self.store = store
        self.config = config
        self.clock = Clock()
        self.sup = Supervisor(
            store=store,
            clock=self.clock,
            config=config,
            behaviour=actor_factory(handler),
            # (handlers under test do not use ctx.system)
            new_context=lambda data: Context(data.session_id, None, data),  # type: ignore[arg-type]
            pending=store.count(MessageState.PENDING, MessageState.IN_FLIGHT),
            dead=store.count(MessageState.DEAD),
            rng=random.Random(0),
        )
        self.router = Router(store, self.sup, self.sup.timer, config.key_retention)
        self._stop_begun = False
        self.stop_done = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def send(self, session_id: str, body: Any, *, delay: float | None = None) -> int:
        """As ``System.send``: through the router (claim on delivery included)."""
        now = self.clock.now()
        data = encode_body(body, self.config.max_message_bytes)
        batch, index = self.router.add(
            session_id, data, now, None if delay is None else now + delay
        )
        await batch.wait()
        if batch.error is not None:
            raise batch.error
        return batch.first_id + index

    async def send_many(self, session_id: str, bodies: list[Any]) -> list[int]:
        """Sends that commit in one batch (so they may be handed together)."""
        now = self.clock.now()
        datas = [encode_body(b, self.config.max_message_bytes) for b in bodies]
        batch, index = self.router.add_many([session_id] * len(datas), datas, now, None)
        await batch.wait()
        if batch.error is not None:
            raise batch.error
        return [batch.first_id + index + i for i in range(len(datas))]

    def put(self, session_id: str, body: Any, **fields: Any) -> Row:
        """Insert a message into the store directly, and tell the supervisor (no handoff)."""
        row = self.store.put(session_id, body, enqueued_at=self.clock.now(), **fields)
        self.sup.outstanding.add(1)
        if row.seq is not None:
            self.sup.ensure(session_id, row.seq)
        return row

    async def drain(self) -> None:
        """As ``System.drain``: until nothing is pending or in flight."""
        await self.router.flushed()
        await self.sup.outstanding.wait_zero()

    def actor(self, session_id: str) -> SessionActor | None:
        """The session's live actor, if any."""
        return self.sup._actors.get(session_id)

    def stop(self, grace: float) -> None:
        """As ``System`` stops: refuse sends, no new handler; running ones get ``grace`` seconds."""
        deadline = trio.current_time() + grace
        if self._stop_begun:
            self.sup.hasten(deadline)
            return
        self._stop_begun = True
        self.router.close()
        self.sup.begin_stop()
        assert self._nursery is not None
        self._nursery.start_soon(self._stop, deadline)

    async def _stop(self, deadline: float) -> None:
        try:
            await self.router.finished.wait()
            await self.sup.stop(deadline)
        finally:
            self.stop_done.set()

    async def run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await nursery.start(self.sup.run)
        nursery.start_soon(self.router.run, name="router")
        nursery.start_soon(self.sup.timer.run, name="timer")


@asynccontextmanager
async def running(
    handler: object, store: MemoryStore | None = None, **options: Any
) -> AsyncIterator[Rig]:
    """Run a supervisor on ``store`` (a fresh MemoryStore by default) with ``options``.

    Leaving the block stops it: a hard stop (no grace) unless the test began
    a stop itself (``rig.stop(grace)``), which is then waited for.
    """
    rig = Rig(store if store is not None else MemoryStore(), Config(**options), handler)
    async with trio.open_nursery() as nursery:
        await rig.run(nursery)
        yield rig
        rig.stop(0.0)
        await rig.stop_done.wait()
        nursery.cancel_scope.cancel()


async def settle() -> None:
    """Let every task run until all of them wait (time does not move on a still MockClock)."""
    await trio.testing.wait_all_tasks_blocked()
