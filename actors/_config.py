"""The options of ``run_system``, validated once at the boundary."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from . import _validate as v
from ._policy import Backoff, RestartPolicy

_COUNT = v.field(v.check_option_int)
_POSITIVE_SECONDS = v.field(v.check_seconds, positive=True)


class UnknownOptionError(TypeError, ValueError):
    """An option ``run_system`` does not know, or that means nothing for the
    database it was given (``durability`` on PostgreSQL, ``lease_ttl`` on
    SQLite). Both a TypeError (a wrong keyword, as Python calls it) and a
    ValueError (a wrong setting), so either ``except`` catches it."""


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

    Each option is checked when the Config is built (before ``run_system``
    touches the file): ``TypeError`` for a wrong type (a bool is not a
    count), ``ValueError`` out of range. Counts are ints from 1 to 2**31 - 1;
    ``max_message_bytes`` at most 512 MiB; seconds finite, > 0
    (``key_retention`` >= 0), at most 10**9 (``busy_timeout`` at most one
    day: SQLite takes it in milliseconds, as a C int).
    """

    max_attempts: int = attrs.field(default=4, validator=_COUNT)
    retry_backoff: Backoff = attrs.field(factory=Backoff, validator=v.instance_of(Backoff))
    handler_timeout: float | None = attrs.field(
        default=300.0, validator=v.optional(v.check_seconds, positive=True)
    )
    idle_timeout: float = attrs.field(default=60.0, validator=_POSITIVE_SECONDS)
    max_active: int = attrs.field(default=1000, validator=_COUNT)
    fair_share: int = attrs.field(default=32, validator=_COUNT)
    restart_policy: RestartPolicy = attrs.field(
        factory=RestartPolicy, validator=v.instance_of(RestartPolicy)
    )
    durability: Literal["normal", "full"] = attrs.field(
        default="normal", validator=v.field(v.check_choice, choices=("normal", "full"))
    )
    max_message_bytes: int = attrs.field(
        default=1 << 20,
        validator=v.field(v.check_int, minimum=1, maximum=v.MAX_MESSAGE_BYTES),
    )
    shutdown_timeout: float = attrs.field(default=10.0, validator=_POSITIVE_SECONDS)
    mailbox_size: int = attrs.field(default=256, validator=_COUNT)
    busy_timeout: float = attrs.field(
        default=5.0,
        validator=v.field(v.check_seconds, positive=True, maximum=v.MAX_BUSY_TIMEOUT),
    )
    key_retention: float = attrs.field(default=86400.0, validator=v.field(v.check_seconds))
    status_interval: float = attrs.field(default=1.0, validator=_POSITIVE_SECONDS)
    control_interval: float = attrs.field(default=0.5, validator=_POSITIVE_SECONDS)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Config:
        """Build from ``run_system``'s keyword options, naming unknown ones."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UnknownOptionError(
                f"run_system() got unknown option(s) {', '.join(unknown)}; "
                f"known options: {', '.join(sorted(known))}"
            )
        return cls(**options)
