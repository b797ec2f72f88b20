"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A fresh database file path for one test."""
    return str(tmp_path / "actors.db")
