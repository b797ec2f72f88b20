"""The options of ``run_system``, validated once at the boundary."""

from __future__ import annotations

import math
from typing import Any, Literal

import attrs

from ._policy import Backoff, RestartPolicy


def _positive_int(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be an int >= 1, got {value!r}")


def _positive_seconds(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number of seconds > 0, got {value!r}")


def _non_negative_seconds(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{attribute.name} must be a finite number of seconds >= 0, got {value!r}")


def _optional_seconds(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        _positive_seconds(_inst, attribute, value)


@attrs.frozen(kw_only=True)
class Config:
    """Every option of :func:`run_system`, with its default.

    max_attempts: handler attempts per message before it is dead-lettered
      (one try and three retries by default, as in the seed).
    retry_backoff: delay before each retry of a failed message; the session's
      later messages wait behind it (per-session order).
    handler_timeout: seconds a handler may run before it is cancelled and the
      attempt counts as failed; ``None`` for no limit.
    idle_timeout: seconds an actor waits for work before it is passivated.
    max_active: most session actors alive at once; sessions beyond it wait
      their turn, oldest work first.
    fair_share: messages an actor may process in a row while other sessions
      wait for a slot; then it yields its slot and queues up again.
    restart_policy: how crashed actors are restarted (see RestartPolicy).
    durability: ``"normal"`` survives a crash of the process (SQLite WAL,
      synchronous=NORMAL); ``"full"`` also survives power loss
      (synchronous=FULL, one fsync per group commit).
    max_message_bytes: largest encoded body ``send()`` accepts.
    shutdown_timeout: on leaving ``async with``, how long running handlers
      may take to finish before they are cancelled.
    mailbox_size: messages handed to, or claimed in bulk for, one actor
      ahead of the one it runs; beyond it, work waits in the database and
      the actor claims it from there.
    busy_timeout: seconds SQLite waits for a lock held by another connection
      (a CLI reader, a backup) before it reports the database busy.
    key_retention: seconds an idempotency key (``send(key=...)``) is
      remembered after its message was processed; while the message is
      pending, in flight or dead it is always remembered.
    status_interval: seconds between the ``"backlog"`` events of
      ``System.events()`` (only while someone subscribes), and between
      the heartbeats the system writes for ``actors health``.
    control_interval: seconds between the system's looks at the control
      table, where ``actors retry / abort / purge`` leave their requests
      while the system runs.
    """

    max_attempts: int = attrs.field(default=4, validator=_positive_int)
    retry_backoff: Backoff = attrs.field(
        factory=Backoff, validator=attrs.validators.instance_of(Backoff)
    )
    handler_timeout: float | None = attrs.field(default=300.0, validator=_optional_seconds)
    idle_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    max_active: int = attrs.field(default=1000, validator=_positive_int)
    fair_share: int = attrs.field(default=32, validator=_positive_int)
    restart_policy: RestartPolicy = attrs.field(
        factory=RestartPolicy, validator=attrs.validators.instance_of(RestartPolicy)
    )
    durability: Literal["normal", "full"] = attrs.field(
        default="normal", validator=attrs.validators.in_(("normal", "full"))
    )
    max_message_bytes: int = attrs.field(default=1 << 20, validator=_positive_int)
    shutdown_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    mailbox_size: int = attrs.field(default=256, validator=_positive_int)
    busy_timeout: float = attrs.field(default=5.0, validator=_positive_seconds)
    key_retention: float = attrs.field(default=86400.0, validator=_non_negative_seconds)
    status_interval: float = attrs.field(default=1.0, validator=_positive_seconds)
    control_interval: float = attrs.field(default=0.5, validator=_positive_seconds)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Config:
        """Build from ``run_system``'s keyword options, naming unknown ones."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"run_system() got unknown option(s) {', '.join(unknown)}; "
                f"known options: {', '.join(sorted(known))}"
            )
        return cls(**options)


def finite_delay(delay: float | None) -> float:
    """Validate ``send(delay=...)``: ``None`` or a finite number of seconds >= 0."""
    if delay is None:
        return 0.0
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise TypeError(f"delay must be a number of seconds or None, got {type(delay).__name__}")
    if not math.isfinite(delay) or delay < 0:
        raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
    return float(delay)
