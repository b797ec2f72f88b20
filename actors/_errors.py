"""The library's exceptions: one place that says what can go wrong."""

from __future__ import annotations

import trio


class ActorsError(Exception):
    """Base class of every error raised by ``actors`` itself."""


class SystemClosedError(ActorsError, trio.ClosedResourceError):
    """The system is shutting down or has stopped; it accepts no more work.

    Raised by :meth:`System.send` (and the other mutating calls) once the
    ``async with run_system(...)`` block has begun to exit. Nothing was
    persisted by the call that raised it.
    """


class DatabaseInUseError(ActorsError):
    """Another running system, in this process or another, owns the database.

    Only one system may run on a database file at a time. ``owner`` describes
    the holder (process id, host, start time) as far as it could be read.
    """

    def __init__(self, path: str, owner: str) -> None:
        super().__init__(
            f"database {path!r} is already in use by another running system ({owner}); "
            "only one system may run on a database file at a time"
        )
        self.path = path
        self.owner = owner


class StoreError(ActorsError):
    """The database failed (I/O error, disk full, corruption, not a database).

    A ``send()`` that raises this did not acknowledge its message. The running
    system stops and the same error surfaces from ``async with run_system``.
    The original exception is chained as ``__cause__``.
    """


class SchemaVersionError(StoreError):
    """The database was written by a newer version of ``actors``."""


class MessageTooLargeError(ActorsError, ValueError):
    """An encoded message body is larger than ``max_message_bytes``."""


class HandlerTimeoutError(ActorsError, TimeoutError):
    """A handler ran longer than ``handler_timeout`` and was cancelled.

    Never raised to your code: it is what a dead letter's ``last_error`` names
    when the attempts ran out this way.
    """


class ActorKilledError(ActorsError):
    """The actor was killed (``System.kill``) while the message was in flight.

    Never raised to your code: it is recorded as the failed attempt's error.
    """


class AskTimeoutError(ActorsError, TimeoutError):
    """``System.ask`` got no reply within its ``timeout``.

    The message itself is durable and is still processed; only the reply
    is dropped.
    """


class DeadLetteredError(ActorsError):
    """The message an ``ask`` waited for was moved to dead letters.

    Raised by ``ask`` when the message ran out of attempts without the
    handler itself raising (its actor was killed, or the process died, on
    every attempt), or could not be decoded. ``message_id`` names it.
    """

    def __init__(self, message_id: int, reason: str) -> None:
        super().__init__(f"message {message_id} was moved to dead letters: {reason}")
        self.message_id = message_id


class RemoteHandlerError(ActorsError):
    """The handler of an ``ask``'s message raised in another process of a cluster.

    The exception itself stays in that process (it may not even be
    importable here); ``ask`` raises this instead, with its type's name in
    ``type_name`` and its text, traceback included, in ``text``.
    """

    def __init__(self, message_id: int, type_name: str, text: str) -> None:
        first = text.strip().splitlines()[-1] if text.strip() else type_name
        super().__init__(f"the handler of message {message_id} raised {type_name}: {first}")
        self.message_id = message_id
        self.type_name = type_name
        self.text = text


class Reject(ActorsError):
    """Raise it from a handler to give up on the message now: no retries.

    ``raise actors.Reject("unknown command 'frobnicate'")`` moves the
    message being handled to dead letters at once, whatever attempts are
    left; its ``last_error`` begins with ``rejected by the handler:`` and
    the reason, followed by the traceback. As after any failed attempt,
    nothing the handler did is committed (``ctx.state``, ``ctx.send``), an
    ``ask`` waiting for the message raises this exception, and the next
    message gets a fresh actor instance. A rejection does not count as a
    crash for the restart policy.

    Raised in a nursery inside the handler, it arrives in an exception
    group: a group whose every exception is a ``Reject`` rejects too.
    Anywhere else (``started()``, ``stopped()``) it is an ordinary error.

    Raises:
      TypeError: ``reason`` is not a ``str``.
    """

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str):
            raise TypeError(f"Reject(reason) takes a str, got {type(reason).__name__}")
        super().__init__(reason)
        self.reason = reason
