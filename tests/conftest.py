"""Shared fixtures. (Shared plain helpers are in helpers.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from faultvfs import FaultVFS
from rig import PhaseLog


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A fresh database file path for one test."""
    return str(tmp_path / "actors.db")


@pytest.fixture(params=["mock", "real"])
def clock(request: pytest.FixtureRequest) -> trio.testing.MockClock | None:
    """Run the test twice: on an autojumping MockClock (the store runs each
    operation inline, on the trio thread) and on the real clock (the store's
    committer, group transactions)."""
    if request.param == "mock":
        return trio.testing.MockClock(autojump_threshold=0)
    return None


@pytest.fixture(params=["inline", "threaded"])
def store_clock(request: pytest.FixtureRequest) -> trio.testing.MockClock | None:
    """A MockClock (the store runs inline) or None (real clock: the store's committer).

    pytest-trio runs the test on whichever fixture value is a clock, so a test
    that asks for this one (and not ``clock``) runs in both of the store's modes.
    """
    if request.param == "inline":
        return trio.testing.MockClock(autojump_threshold=0)
    return None


@pytest.fixture
def vfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FaultVFS]:
    """A FaultVFS over the files under ``tmp_path``.

    What it injected is added to the test module's ``FAULTS`` counter (a
    ``collections.Counter``), which that module reports at its end.
    """
    with FaultVFS(under=str(tmp_path)) as shim:
        yield shim
    request.module.FAULTS.update(shim.injected)


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that ended a thread (the store's sync thread, a worker thread) unhandled."""
    errors: list[BaseException] = []

    def hook(args: threading.ExceptHookArgs) -> None:
        errors.append(args.exc_value or RuntimeError(repr(args)))

    monkeypatch.setattr(threading, "excepthook", hook)
    return errors


@pytest.fixture
def still_clock() -> trio.testing.MockClock:
    """A MockClock that moves only when the test jumps it (the fake store's tests)."""
    return trio.testing.MockClock()


@pytest.fixture
def phases(monkeypatch: pytest.MonkeyPatch) -> PhaseLog:
    """Every phase change of every session actor (tests/rig.py)."""
    return PhaseLog(monkeypatch)
