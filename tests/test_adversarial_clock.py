"""The wall clock jumps across a restart.

Delays (``send(delay=...)``) and retry waits are stored as epoch deadlines.
A clock that is an hour behind at the next start must not hold a session
for an hour: a wait lasts at most what it was when written (see
docs/guarantees.md, "Clock jumps"). Run on a MockClock (virtual time, the
store inline) with waits of tens of seconds, and on the real clock (the
store's committer) with waits of a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable

import apsw
import pytest
import trio
import trio.lowlevel
import trio.testing

import actors
from actors import _clock

START = 1_800_000_000.0  # the fake wall clock's time at the first start
HOUR = 3600.0


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A wall clock that says ``wall[0]``, whatever the time (trio's clock moves on)."""
    now = [START]
    monkeypatch.setattr(_clock, "wall_time", lambda: now[0])
    return now


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


def not_before(path: str) -> list[float | None]:
    conn = apsw.Connection(path)
    try:
        return [r[0] for r in conn.execute("SELECT not_before FROM messages ORDER BY id")]
    finally:
        conn.close()


async def run_and_time(path: str, wait: float, **options: object) -> float:
    """Start a system; the seconds (trio's clock) until the message ran."""
    ran = trio.Event()
    started = trio.current_time()
    at: list[float] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        at.append(trio.current_time() - started)
        ran.set()

    async with actors.run_system(path, handler=handler, **options) as system:  # type: ignore[arg-type]
        with trio.fail_after(wait * 10):  # a hang detector: an hour would be far beyond
            await ran.wait()
        await system.drain()
    return at[0]


@pytest.mark.parametrize("kind", ["delay", "retry"])
async def test_a_clock_an_hour_behind_at_restart(
    db_path: str,
    clock: trio.testing.MockClock | None,
    wall: list[float],
    kind: str,
) -> None:
    wait = 30.0 if clock is not None else 0.5
    options: dict[str, object] = {
        "retry_backoff": actors.Backoff(initial=wait, maximum=wait, jitter=0.0),
    }
    failed = trio.Event()

    async def fail_once(ctx: actors.Context, msg: actors.Message) -> None:
        failed.set()
        raise RuntimeError("the first attempt fails")

    handler: Callable[..., object] = fail_once
    async with actors.run_system(db_path, handler=handler, **options) as system:  # type: ignore[arg-type]
        if kind == "delay":
            await system.send("s", "later", delay=wait)
        else:
            await system.send("s", "retried")
            await failed.wait()
            # The failed attempt is counted once its record (the retry wait)
            # committed; nothing else signals that. (A checkpoint never blocks,
            # so a MockClock cannot jump to the retry meanwhile.)
            while system.statistics().failed_attempts < 1:
                await trio.lowlevel.checkpoint()
    [deadline] = not_before(db_path)
    assert deadline is not None and deadline > START  # a wait is stored
    wall[0] = START - HOUR  # the clock went back an hour while the system was down
    elapsed = await run_and_time(db_path, wait, **options)
    # It ran within its original wait (less whatever of it had passed), not an hour later.
    assert elapsed <= wait + 0.25 * wait, elapsed
    if clock is not None:  # (virtual time is exact: the wait was kept, not dropped)
        assert elapsed >= wait - 1.0, elapsed


async def test_a_clock_that_went_forward_ends_waits_early(
    db_path: str, clock: trio.testing.MockClock | None, wall: list[float]
) -> None:
    """Documented, not prevented: nothing tells a forward jump from time that passed."""
    wait = HOUR
    async with actors.run_system(db_path, handler=noop) as system:
        await system.send("s", "later", delay=wait)
    wall[0] = START + HOUR
    elapsed = await run_and_time(db_path, wait)
    assert elapsed < 1.0


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_clock_that_stays_behind_over_restarts(
    db_path: str, virtual_clock: trio.testing.MockClock, wall: list[float]
) -> None:
    """Moved once, a deadline is not moved again at the next start while the
    clock is still behind: the wait is neither lengthened nor dropped."""
    wait = 60.0
    async with actors.run_system(db_path, handler=noop) as system:
        await system.send("s", "later", delay=wait)
    wall[0] = START - HOUR
    async with actors.run_system(db_path, handler=noop):
        pass
    first = not_before(db_path)
    wall[0] = START - HOUR + 1.0  # a second later, still an hour behind
    async with actors.run_system(db_path, handler=noop):
        pass
    assert not_before(db_path) == first
    assert first[0] is not None and START - HOUR + wait - 1.0 <= first[0] <= START - HOUR + wait
