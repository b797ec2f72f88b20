"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing


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
