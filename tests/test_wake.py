"""Waking parked tasks on the hot path.

- WOKEN: one outcome wakes every parked task, any number of times
  (actors/_wake.py). The sender, actor and committer waits are all woken
  with the same instance; a plain ``outcome.Value`` would refuse its second
  unwrap.
- A batch's senders (actors/_router.py, Batch): a sender cancelled while it
  waits is never woken by the batch afterwards, wherever it waits by then,
  and one that waits again for the same batch is woken once.
"""

from __future__ import annotations

import outcome
import trio
import trio.testing

from actors._router import Batch
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


async def test_a_batch_wakes_its_waiters_but_not_one_cancelled_since(
    autojump_clock: trio.testing.MockClock,
) -> None:
    batch = Batch()
    elsewhere = trio.Event()
    log: list[str] = []

    async def steady() -> None:
        await batch.wait()
        log.append("steady woken")

    async def cancelled_wait() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await batch.wait()
        assert scope.cancelled_caught

    async def moves_on() -> None:
        await cancelled_wait()
        # It waits somewhere else now: the batch must leave it there.
        await elsewhere.wait()
        log.append("moved on woken")

    async def waits_again() -> None:
        await cancelled_wait()
        await batch.wait()  # listed twice now: woken once
        log.append("waited again woken")
        await trio.sleep(1)  # a second wake would end this sleep early (or crash trio)
        log.append("slept")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for fn in (steady, moves_on, waits_again):
                nursery.start_soon(fn)
            await trio.testing.wait_all_tasks_blocked()
            assert log == []
            batch.finish()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(log) == ["steady woken", "waited again woken"]
            assert batch.waiters == []
            start = trio.current_time()
            while "slept" not in log:
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(0.25)
            assert trio.current_time() - start >= 1
            assert "moved on woken" not in log
            elsewhere.set()
    assert sorted(log) == ["moved on woken", "slept", "steady woken", "waited again woken"]


async def test_waiting_for_a_finished_batch_returns_at_once() -> None:
    batch = Batch()
    batch.finish()
    with trio.testing.assert_checkpoints():
        await batch.wait()
