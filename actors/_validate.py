"""The argument checks of the public API, the options and the control channel.

One place decides what a valid message id, count or number of seconds is,
so that ``System``'s methods, ``Config``, ``Backoff``/``RestartPolicy`` and
the requests that arrive through the control table (``actors abort --id``
against a running system) agree. Each check runs before anything reaches
the store or a running task: a bad argument raises at its caller and never
reaches (or stops) the running system.

- ``TypeError`` for a wrong type. A ``bool`` is not a number here (``True``
  is refused where an int or a number of seconds is expected), and
  neither is a ``str`` that looks like one.
- ``ValueError`` for a value out of range, never ``OverflowError``: ranges
  are checked by comparison first, which is exact for ints of any size and
  false for NaN, and only a value in range is converted.

The ranges (documented in docs/reference.md):

- Message ids: 1 to ``MAX_INT`` (2**63 - 1), what an SQLite INTEGER holds;
  ids start at 1, so 0 and negative ids cannot exist and are refused.
- Limits and buffers: ints up to ``MAX_INT`` (a limit reaches SQLite).
- The options' counts (``max_attempts``, ``mailbox_size``, ...): 1 to
  ``MAX_OPTION_INT`` (2**31 - 1), with room for the arithmetic done on them.
- Seconds: finite, >= 0 (or > 0), at most ``MAX_SECONDS`` (10**9 s, about
  31.7 years), so that a deadline (a wall-clock or trio time plus the
  duration) and a conversion to milliseconds stay finite and in range.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from ._codec import check_session_id

MAX_INT = 2**63 - 1  # SQLite's INTEGER
MAX_OPTION_INT = 2**31 - 1  # run_system's counts: far beyond need, safe in any arithmetic
MAX_SECONDS = 1e9  # about 31.7 years
# SQLite takes its busy timeout as a C int of milliseconds (24.8 days at most).
MAX_BUSY_TIMEOUT = 86400.0  # one day
# SQLite stores at most 10**9 bytes in a row (SQLITE_MAX_LENGTH): a body,
# its session id and key must fit in one.
MAX_MESSAGE_BYTES = 2**29  # 512 MiB
_MAX_FLOAT = sys.float_info.max

T = TypeVar("T")


def value_text(value: object) -> str:
    """``repr(value)`` for an error message: short, and never raising.

    A huge int (past Python's digit limit for ``str``) or an object whose
    ``__repr__`` raises must not turn a clear TypeError/ValueError into
    another error.
    """
    if type(value) is int and not -(10**30) < value < 10**30:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _range_text(minimum: float, maximum: float) -> str:
    if maximum == float("inf"):
        return f"number >= {minimum:g} (not NaN)"
    bound = f"from {minimum:g} to {maximum:g}" if maximum < 1e15 else f">= {minimum:g}"
    return f"finite number {bound}"


def check_int(name: str, value: object, *, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """An int (not a bool) from ``minimum`` to ``maximum``.

    Raises:
      TypeError: not an int. ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        bound = (
            f"from {minimum} to {maximum}" if maximum != MAX_INT else f"from {minimum} to 2**63-1"
        )
        raise ValueError(f"{name} must be an int {bound}, got {value_text(value)}")
    return int(value)


def check_message_id(value: object, name: str = "message_id") -> int:
    """A message id: an int from 1 to 2**63 - 1 (ids start at 1).

    Raises:
      TypeError: not an int (a bool, a str, None). ValueError: 0, negative,
        or beyond what SQLite stores (no such message can exist).
    """
    return check_int(name, value, minimum=1)


def check_option_int(name: str, value: object) -> int:
    """A count option of ``run_system``: an int from 1 to 2**31 - 1."""
    return check_int(name, value, minimum=1, maximum=MAX_OPTION_INT)


def check_seconds(
    name: str, value: object, *, positive: bool = False, maximum: float = MAX_SECONDS
) -> float:
    """A finite number of seconds, >= 0 (> 0 with ``positive``), at most ``maximum``.

    Raises:
      TypeError: not an int or float (a bool, a str, a timedelta).
      ValueError: negative (or 0 with ``positive``), NaN, infinite, or over
        ``maximum``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    # One chained comparison: false for NaN and infinities, exact for huge ints.
    if not 0 <= value <= maximum or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"{name} must be a finite number of seconds {bound} and at most {maximum:g}, "
            f"got {value_text(value)}"
        )
    return float(value)


def check_number(name: str, value: object, *, minimum: float, maximum: float = _MAX_FLOAT) -> float:
    """A finite number (int or float, not a bool) from ``minimum`` to ``maximum``.

    Raises:
      TypeError: not a number. ValueError: out of range, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(
            f"{name} must be a {_range_text(minimum, maximum)}, got {value_text(value)}"
        )
    return float(value)


def check_flag(name: str, value: object) -> bool:
    """A bool (not a truthy value of another type).

    Raises:
      TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def purge_scope(
    session_id: str | None, dead: bool, older_than: float | None, now: float
) -> tuple[str | None, float | None]:
    """Check ``purge``'s arguments; returns (session_id, before).

    ``before`` is ``now - older_than`` (dead letters sent before it go), or
    None without ``older_than``.

    Raises:
      ValueError: neither a session nor ``dead=True``; ``older_than``
        without ``dead=True``; ``older_than`` out of range.
      TypeError: a session id, ``dead`` or ``older_than`` of the wrong type.
    """
    check_flag("dead", dead)
    if session_id is not None:
        session_id = check_session_id(session_id)
    elif not dead:
        raise ValueError("purge needs a session_id, or dead=True (dead letters of every session)")
    if older_than is None:
        return session_id, None
    if not dead:
        raise ValueError("older_than applies to dead letters only: pass dead=True")
    return session_id, now - check_seconds("older_than", older_than)


def field(
    check: Callable[..., object], **bounds: Any
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """An attrs validator that runs ``check(attribute.name, value, **bounds)``."""

    def validate(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        check(attribute.name, value, **bounds)

    return validate


def optional(
    check: Callable[..., object], **bounds: Any
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """As :func:`field`, with ``None`` allowed."""

    def validate(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            check(attribute.name, value, **bounds)

    return validate


def check_instance(name: str, value: object, cls: type[T], *, optional: bool = False) -> T | None:
    """A ``cls`` (or None, with ``optional``).

    Raises:
      TypeError: anything else, naming ``cls`` as ``module.Name`` unless it
        is one of this package's.
    """
    if isinstance(value, cls) or (optional and value is None):
        return value
    what = (
        cls.__name__ if cls.__module__.startswith("actors") else f"{cls.__module__}.{cls.__name__}"
    )
    raise TypeError(
        f"{name} must be a {what}{' or None' if optional else ''}, got {type(value).__name__}"
    )


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``.

    Raises:
      TypeError: not a str. ValueError: not one of them.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        *rest, last = (repr(c) for c in choices)
        allowed = f"{', '.join(rest)} or {last}" if rest else last
        raise ValueError(f"{name} must be {allowed}, got {value_text(value)}")
    return value


def instance_of(cls: type) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    """An attrs validator: ``TypeError`` naming the field unless ``value`` is a ``cls``."""
    return field(check_instance, cls=cls)
