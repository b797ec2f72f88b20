"""Shared fixtures. (Shared plain helpers are in helpers.py.)"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pgserver
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


def _pg_plan() -> pgserver.Plan:
    env = os.environ
    return pgserver.plan_server(env, pgserver.find_bindir(env), pgserver.have_psycopg())


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server for this run (tests/pgserver.py).

    ``ACTORS_TEST_POSTGRES`` when set, else a throwaway server started here and
    stopped at the end of the run. Without either, the tests that use it are
    skipped with one line saying how to get one; when ``CI`` is set they fail.
    """
    plan = _pg_plan()
    if isinstance(plan, pgserver.Unavailable):
        if plan.fatal:
            pytest.fail(plan.reason, pytrace=False)
        pytest.skip(plan.reason)
    if isinstance(plan, pgserver.Existing):
        yield plan.url
        return
    with pgserver.throwaway_server(plan.bindir) as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """The URL of a new, empty database of its own for one test, dropped after it."""
    with pgserver.fresh_database(pg_server) as url:
        yield url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test of a module run on both stores that is about SQLite alone
    # (``sqlite_only``) has no PostgreSQL case: deselected, not skipped.
    alone = [
        item
        for item in items
        if item.get_closest_marker("sqlite_only") is not None
        and getattr(getattr(item, "callspec", None), "params", {}).get("store") == "postgres"
    ]
    if alone:
        config.hook.pytest_deselected(items=alone)
        items[:] = [item for item in items if item not in alone]
    # Every test that needs PostgreSQL is marked ``postgres`` (-m "not postgres"
    # leaves them out) by what it uses, so that none can forget the mark.
    users = [item for item in items if "pg_server" in getattr(item, "fixturenames", ())]
    if not users:
        return
    plan = _pg_plan()
    # Skipped by a mark rather than by the fixture alone: -ra then folds the
    # skips into one line per file instead of one per test.
    for item in users:
        item.add_marker(pytest.mark.postgres)
        if isinstance(plan, pgserver.Unavailable) and not plan.fatal:
            item.add_marker(pytest.mark.skip(reason=plan.reason))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database of a behaviour test, once per store: an SQLite file, then a
    PostgreSQL database of its own (a URL). A module whose tests hold on both
    stores overrides ``db_path`` with it; a test of such a module that is
    about SQLite alone is marked ``sqlite_only``."""
    if request.param == "sqlite":
        return str(tmp_path / "actors.db")
    return str(request.getfixturevalue("pg_url"))
