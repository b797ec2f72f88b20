"""Waking a parked task without building an outcome per wake.

``trio.lowlevel.reschedule(task)`` wraps ``None`` in a fresh
``outcome.Value`` each time, and the woken task's ``unwrap()`` marks it used
(the check that an outcome is unwrapped once). On the hot path a task is
woken about twice per message (the sender when its batch commits, the actor
when messages are handed to it): building and unwrapping those values was
about 5% of the loop's time at full load (py-spy, ``docs/performance.md``).

``WOKEN`` is an :class:`outcome.Outcome` of ``None`` that holds no state, so
one instance serves every wake. It is what ``reschedule`` documents it takes
(an ``Outcome``); only the single-use check is left out, and a task woken
with ``None`` has nothing to misuse. (``outcome`` is trio's own dependency,
and the type of that argument.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import outcome


class _Woken(outcome.Outcome[None]):
    """The outcome ``None``, reusable (no single-use flag to set)."""

    __slots__ = ()

    def unwrap(self) -> None:
        return None

    def send(self, gen: Generator[Any, None, object]) -> Any:
        return gen.send(None)

    async def asend(self, agen: AsyncGenerator[Any, None]) -> Any:
        return await agen.asend(None)

    def __repr__(self) -> str:
        return "WOKEN"


# trio.lowlevel.reschedule(task, WOKEN): the task's wait returns None.
WOKEN: outcome.Outcome[None] = _Woken()
