"""WOKEN: one outcome wakes every parked task, any number of times (actors/_wake.py).

The sender, actor and committer waits of the hot path are all woken with
the same instance; a plain ``outcome.Value`` would refuse its second unwrap.
"""

from __future__ import annotations

import outcome
import trio
import trio.testing

from actors._wake import WOKEN


async def test_one_woken_serves_many_waits_of_many_tasks() -> None:
    parked: list[trio.lowlevel.Task] = []
    returned: list[object] = []

    def abort(_: object) -> trio.lowlevel.Abort:
        raise AssertionError("nothing cancels these waits")

    async def waiter() -> None:
        for _ in range(3):
            parked.append(trio.lowlevel.current_task())
            returned.append(await trio.lowlevel.wait_task_rescheduled(abort))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(waiter)
        for _ in range(3):
            await trio.testing.wait_all_tasks_blocked()
            assert len(parked) == 4
            woken, parked[:] = list(parked), []
            for task in woken:
                trio.lowlevel.reschedule(task, WOKEN)
    assert returned == [None] * 12
    assert isinstance(WOKEN, outcome.Outcome)


def test_woken_sends_none_into_generators() -> None:
    def gen():  # type: ignore[no-untyped-def]
        received = yield "first"
        yield received

    g = gen()
    assert next(g) == "first"
    assert WOKEN.send(g) is None
    assert WOKEN.unwrap() is None
    assert WOKEN.unwrap() is None  # again: no single-use flag


async def test_woken_asends_none_into_async_generators() -> None:
    async def agen():  # type: ignore[no-untyped-def]
        received = yield "first"
        yield received

    g = agen()
    assert await g.__anext__() == "first"
    assert await WOKEN.asend(g) is None
    await g.aclose()
