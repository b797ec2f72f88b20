"""actors: embedded, durable, per-key actors for trio on SQLite (or PostgreSQL, clustered).

One actor per session key processes that session's messages strictly in
order; sessions run concurrently; every message is on disk before
``send()`` returns, and nothing acknowledged is lost when a handler, an
actor or the whole process dies.

    async with actors.run_system("app.db", handler=handle) as system:
        await system.send("session-1", {"kind": "observation"})
"""

from ._bridge import AsyncioSubscription, BlockingSubscription, Bridge, BridgeStatistics
from ._config import Config, UnknownOptionError
from ._context import Actor, Context, batched
from ._errors import (
    ActorKilledError,
    ActorsError,
    AskTimeoutError,
    DatabaseInUseError,
    DeadLetteredError,
    HandlerTimeoutError,
    MessageTooLargeError,
    Reject,
    RemoteHandlerError,
    SchemaVersionError,
    StoreError,
    SystemClosedError,
)
from ._health import Health
from ._policy import Backoff, RestartPolicy
from ._records import DeadLetter, Message, SystemStatistics
from ._run import run_system
from ._streams import StatusEvent, Subscription, SubscriptionStatistics
from ._system import System

__all__ = [
    "Actor",
    "ActorKilledError",
    "ActorsError",
    "AskTimeoutError",
    "AsyncioSubscription",
    "Backoff",
    "BlockingSubscription",
    "Bridge",
    "BridgeStatistics",
    "Config",
    "Context",
    "DatabaseInUseError",
    "DeadLetter",
    "DeadLetteredError",
    "HandlerTimeoutError",
    "Health",
    "Message",
    "MessageTooLargeError",
    "Reject",
    "RemoteHandlerError",
    "RestartPolicy",
    "SchemaVersionError",
    "StatusEvent",
    "StoreError",
    "Subscription",
    "SubscriptionStatistics",
    "System",
    "SystemClosedError",
    "SystemStatistics",
    "UnknownOptionError",
    "batched",
    "run_system",
]

__version__ = "0.1.0"
