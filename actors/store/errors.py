"""The one place where what SQLite (apsw) raises becomes the library's errors.

Everything above the store sees :class:`~actors.StoreError` (or a subclass),
with the original exception chained as ``__cause__``; nothing above it
catches an apsw exception. httpcore's ``map_exceptions`` is the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import apsw

from .._errors import SchemaVersionError, StoreError

__all__ = [
    "SchemaVersionError",
    "StoreError",
    "UnusableDatabaseError",
    "log_exceptions",
    "map_exceptions",
    "store_error",
]


class UnusableDatabaseError(StoreError):
    """The file cannot be read as an actors database: missing, not SQLite,
    without the actors schema, or of a newer schema (the command line's reads)."""


def store_error(what: str, exc: BaseException, to: type[StoreError] = StoreError) -> StoreError:
    """``to("{what}: {exc}")`` with ``exc`` as its cause; a StoreError passes as it is."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, apsw.NotADBError):
        error = to(f"{what}: it is not an SQLite database ({exc})")
    else:
        error = to(f"{what}: {exc}")
    error.__cause__ = exc
    return error


@contextmanager
def map_exceptions(
    what: str,
    *,
    to: type[StoreError] = StoreError,
    also: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Raise an apsw error (or one of ``also``) from inside as ``to("{what}: ...")``.

    A StoreError raised inside passes unchanged, so that a more precise one
    (SchemaVersionError, a refusal that names the problem) is not reworded.
    """
    catch: tuple[type[Exception], ...] = (apsw.Error, *also)
    try:
        yield
    except StoreError:
        raise
    except catch as exc:
        raise store_error(what, exc, to) from exc


@contextmanager
def log_exceptions(log: logging.Logger, what: str, level: int = logging.WARNING) -> Iterator[None]:
    """Log an apsw error from inside and go on: for work whose failure loses
    nothing (a checkpoint, closing after everything was committed)."""
    try:
        yield
    except apsw.Error as exc:
        log.log(level, "%s: %s", what, exc)
