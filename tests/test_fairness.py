"""Fair rotation under max_active: a session waiting for a slot gets one soon.

The promise: with every slot held by sessions that have long backlogs, a
session that gets work later gets a slot after at most about (sessions
waiting ahead of it + 1) x ``fair_share`` messages of the others, whatever
the age of their backlogs. A session that yields its slot goes to the back
of the line, behind every session already waiting (in memory, or only in
the database when the line overflows).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager

import pytest
import trio

import actors
import actors._line as line_module

FAIR_SHARE = 8
HOG_MESSAGES = 300


class Log:
    """The order in which messages were handled, by session."""

    def __init__(self, newcomers_after: int = 0) -> None:
        self.handled: list[str] = []
        self.newcomers_after = newcomers_after
        self.entered = trio.Event()  # set once that many messages were handled

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> None:
        if len(self.handled) >= self.newcomers_after:
            self.entered.set()
        await trio.sleep(0.01)
        self.handled.append(msg.session_id)

    def before(self, session: str) -> int:
        """Messages of other sessions handled before ``session``'s first."""
        return self.handled.index(session)


def bound(waiting_ahead: int) -> int:
    """Messages of others a session may wait for, with ``waiting_ahead`` sessions ahead.

    Each turn ahead of it is ``fair_share`` messages of one slot, while the
    other slot runs as many; and the one the other slot finishes while its
    own message runs.
    """
    return 2 * (waiting_ahead + 1) * FAIR_SHARE + 1


def fair_system(db_path: str, log: Log) -> AbstractAsyncContextManager[actors.System]:
    """Two slots, rotated every ``FAIR_SHARE`` messages; ``log`` handles."""
    return actors.run_system(db_path, handler=log.handler, max_active=2, fair_share=FAIR_SHARE)


def backlogs(hogs: Sequence[str], n: int = HOG_MESSAGES) -> list[tuple[str, int]]:
    """``n`` messages for each of ``hogs``, taking turns."""
    return [(s, i) for i in range(n) for s in hogs]


async def hogs_then_newcomers(system: actors.System, log: Log, newcomers: list[str]) -> None:
    await log.entered.wait()
    for name in newcomers:
        await system.send(name, "hello")
    await system.drain()


@pytest.fixture(params=[10_000, 1], ids=["in-memory line", "overflowing line"])
def waiting_limit(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with the waiting line in memory, and with every waiter beyond
    the first found in the database (the line's overflow)."""
    monkeypatch.setattr(line_module, "WAITING_LIMIT", request.param)
    return int(request.param)


async def test_a_newcomer_gets_a_slot_after_a_fair_share_of_two_hogs(
    db_path: str, autojump_clock: object, waiting_limit: int
) -> None:
    log = Log()
    async with fair_system(db_path, log) as system:
        await system.send_many(backlogs(("hog-a", "hog-b")))
        await hogs_then_newcomers(system, log, ["newcomer"])
    assert len(log.handled) == 2 * HOG_MESSAGES + 1
    assert log.before("newcomer") <= bound(0)


async def test_after_a_restart_old_backlogs_do_not_come_first_every_time(
    db_path: str, autojump_clock: object, waiting_limit: int
) -> None:
    # The hogs' backlogs are older than anything sent after the restart:
    # the line must still rotate (a refill from the database goes by age).
    async with actors.run_system(db_path, handler=Log().handler, max_active=1) as system:
        await system.send_many(backlogs(("hog-a", "hog-b")))
        await system.shutdown(0)
    log = Log()
    async with fair_system(db_path, log) as system:
        await hogs_then_newcomers(system, log, ["newcomer"])
    assert log.before("newcomer") <= bound(0)


async def test_each_newcomer_waits_for_those_ahead_of_it_only(
    db_path: str, autojump_clock: object, waiting_limit: int
) -> None:
    newcomers = [f"new-{i}" for i in range(4)]
    log = Log()
    async with fair_system(db_path, log) as system:
        await system.send_many(backlogs(("hog-a", "hog-b")))
        await hogs_then_newcomers(system, log, newcomers)
    for ahead, name in enumerate(newcomers):
        # Messages of the hogs (not of the other newcomers, one each) before its own.
        hogs_before = sum(1 for s in log.handled[: log.before(name)] if s.startswith("hog"))
        assert hogs_before <= bound(ahead), (name, hogs_before)


async def test_hogs_share_the_slots_in_turn(
    db_path: str, autojump_clock: object, waiting_limit: int
) -> None:
    # Three hogs, two slots: none of them waits for another's whole backlog.
    log = Log()
    hogs = ["hog-a", "hog-b", "hog-c"]
    async with fair_system(db_path, log) as system:
        await system.send_many(backlogs(hogs))
        await system.drain()
    # The longest run of messages without a given hog's, while it has work
    # left: about two turns of the others (the one it waits for, and the
    # other slot's).
    for hog in hogs:
        last = max(i for i, s in enumerate(log.handled) if s == hog)
        gap = longest = 0
        for s in log.handled[:last]:
            gap = 0 if s == hog else gap + 1
            longest = max(longest, gap)
        assert longest <= bound(1), (hog, longest)


@pytest.mark.parametrize("keyed", [False, True], ids=["handed", "keyed"])
@pytest.mark.parametrize("pace", [0.002, 0.01])
async def test_hogs_fed_while_they_run_still_yield(
    db_path: str, autojump_clock: object, waiting_limit: int, pace: float, keyed: bool
) -> None:
    # Producers feed the hogs about as fast as they handle: each hog keeps
    # getting new work while it runs, handed to its actor (claim on
    # delivery) or, for keyed sends, announced and claimed from the database.
    log = Log(newcomers_after=40)

    async def feed(system: actors.System, session: str) -> None:
        for i in range(HOG_MESSAGES):
            await system.send(session, i, key=f"{i}" if keyed else None)
            await trio.sleep(pace)

    async with (
        fair_system(db_path, log) as system,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(feed, system, "hog-a")
        nursery.start_soon(feed, system, "hog-b")
        nursery.start_soon(hogs_then_newcomers, system, log, ["newcomer"])
    assert len(log.handled) == 2 * HOG_MESSAGES + 1
    assert log.before("newcomer") - log.newcomers_after <= bound(0)


async def test_a_burst_handed_to_running_hogs_does_not_extend_their_turn(
    db_path: str, autojump_clock: object, waiting_limit: int
) -> None:
    # Both slots run a message each, the newcomer waits; then a burst for
    # each running session is handed to its actor (claimed on delivery).
    # The burst counts in the turn: each yields after fair_share.
    log = Log()
    async with fair_system(db_path, log) as system:
        await system.send_many([("hog-a", -1), ("hog-b", -1)])
        await log.entered.wait()
        await system.send("newcomer", "hello")
        assert system.statistics().waiting_sessions == 1
        await system.send_many(backlogs(("hog-a", "hog-b"), 200))
        await system.drain()
    assert len(log.handled) == 2 * 201 + 1
    assert log.before("newcomer") <= bound(0)
