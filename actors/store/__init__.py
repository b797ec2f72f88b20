"""The store: the runtime's one way to the database.

The rest of the package is written against the protocols of
:mod:`~actors.store.protocol` (``Store`` for a running system,
``StoreViews`` and ``ControlRequests`` for the command line) and the records
of :mod:`~actors.store.records`, exported here. The SQLite implementation
is in :mod:`~actors.store.sqlite` (``SqliteStore``) and
:mod:`~actors.store.sqlite_views`; only what constructs a store imports
them, so that this package's name does not pull a backend in. The group
committer (:mod:`~actors.store.committer`) knows no SQL: a second backend
can reuse it or replace it.
"""

from .errors import SchemaVersionError, StoreError, UnusableDatabaseError
from .paths import database_path
from .protocol import Cluster, ClusterHost, ControlRequests, StartMarks, Store, StoreViews
from .records import (
    Aborted,
    Ack,
    AppendBatch,
    Appended,
    BatchAck,
    Claim,
    Claimed,
    ControlRequest,
    DatabaseCounts,
    DueWork,
    FailOutcome,
    InFlight,
    Member,
    Membership,
    MessageCounts,
    MessageState,
    Opened,
    Purged,
    Sent,
    SessionCounts,
    StoreStatistics,
)

__all__ = [
    "Aborted",
    "Ack",
    "AppendBatch",
    "Appended",
    "BatchAck",
    "Claim",
    "Claimed",
    "Cluster",
    "ClusterHost",
    "ControlRequest",
    "ControlRequests",
    "DatabaseCounts",
    "DueWork",
    "FailOutcome",
    "InFlight",
    "Member",
    "Membership",
    "MessageCounts",
    "MessageState",
    "Opened",
    "Purged",
    "SchemaVersionError",
    "Sent",
    "SessionCounts",
    "StartMarks",
    "Store",
    "StoreError",
    "StoreStatistics",
    "StoreViews",
    "UnusableDatabaseError",
    "database_path",
]
