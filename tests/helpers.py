"""Helpers that several test files share (imported as ``helpers``, like faultvfs).

Fixtures live in conftest.py; these are plain functions and classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import apsw
import trio
from click.testing import CliRunner, Result

import actors
from actors._cli import cli

E = TypeVar("E", bound=BaseException)

HANG = 10.0  # seconds (virtual under MockClock) after which a wait is a hang


async def drain(system: actors.System) -> None:
    with trio.fail_after(HANG):  # fail, not hang, if something was stranded
        await system.drain()


def rows(path: str, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """The rows of ``query`` on the database at ``path``, through a connection of its own."""
    conn = apsw.Connection(path)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()


def drain_nowait(subscription: actors.Subscription[Any]) -> list[Any]:
    """Everything buffered in ``subscription`` right now."""
    out = []
    while True:
        try:
            out.append(subscription.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def find_cause(
    exc: BaseException, kind: type[E], where: Callable[[E], bool] = lambda e: True
) -> E | None:
    """The first ``kind`` (that ``where`` accepts) among ``exc``, its causes and contexts."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind) and where(e):
            return e
        todo += [e.__cause__, e.__context__]
    return None


# -- handlers ---------------------------------------------------------------------


class Blocking:
    """A handler that sets ``entered``, then sleeps ``seconds`` (forever by default).

    It records the bodies it finished (``done``) and those whose attempt was
    cancelled (``cancelled``).
    """

    def __init__(self, seconds: float = math.inf) -> None:
        self.seconds = seconds
        self.entered = trio.Event()
        self.done: list[Any] = []
        self.cancelled: list[Any] = []

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.entered.set()
        try:
            await trio.sleep(self.seconds)
        except trio.Cancelled:
            self.cancelled.append(msg.body)
            raise
        self.done.append(msg.body)


async def rerun(db_path: str) -> list[tuple[Any, int]]:
    """Start again on ``db_path`` and drain; return (body, attempt) of every handler call."""
    seen: list[tuple[Any, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler) as system:
        await system.drain()
    return seen


# -- the command line ---------------------------------------------------------------


def invoke(*args: str) -> Result:
    """The `actors` command, in-process (click's CliRunner)."""
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})


async def ainvoke(*args: str) -> Result:
    """In a thread: a command that acts directly runs trio.run of its own."""
    return await trio.to_thread.run_sync(lambda: invoke(*args))


def heartbeat_fields(**changes: Any) -> dict[str, Any]:
    """A heartbeat's fields as the system writes them (``stopping`` aside), with ``changes``."""
    fields: dict[str, Any] = {
        "at": 0,
        "interval": 1,
        "started_at": 0,
        "last_progress_at": 0,
        "pid": 1,
        "host": "h",
        "processed": 0,
        "dead_lettered": 0,
        "failed_attempts": 0,
        "restarts": 0,
        "pending": 0,
        "in_flight": 0,
        "dead": 0,
    }
    return {**fields, **changes}
