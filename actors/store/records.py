"""What crosses the store boundary: the arguments and results of its operations.

Results are frozen attrs records, but for the few made once per message or
per batch (``Claim``, ``Ack``, and the plain tuples ``AppendBatch``,
``Appended`` and ``Sent``): a frozen attrs instance costs about 0.3 us to
build against 0.1 us for a slotted class, 0.3 us for a NamedTuple of seven
fields and next to nothing for a tuple, and those are on the path every
message takes. They are read-only by convention.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from typing import Literal, TypeAlias

import attrs

from .._records import Message


class MessageState(enum.IntEnum):
    """Where a message is; the values are those the database stores."""

    PENDING = 0  # waiting in its session's queue (delayed and retry-waiting included)
    IN_FLIGHT = 1  # claimed: a handler runs it, or it waits in its actor's memory
    DEAD = 2  # a dead letter


# (session_id, seq) of messages that entered their sessions' queues: what the
# supervisor needs to tell each session's actor about new work.
Sent: TypeAlias = list[tuple[str, int]]

# append's result: the first id of the batch (ids are ``first + index``), and
# for a keyed batch the duplicates (index -> the first message's id) or None.
Appended: TypeAlias = tuple[int, dict[int, int] | None]

# fail's result: back to pending for a retry, dead-lettered, or no such
# message (it was aborted or purged meanwhile).
FailOutcome: TypeAlias = Literal["retry", "dead", "gone"]


# A batch of sends to insert, in order (see ``Store.append``): a plain tuple,
# made once per batch, of
#   sessions: Sequence[str]
#   bodies: Sequence[str | bytes] (encoded)
#   enqueued: Sequence[float] (epoch send times)
#   not_before: Sequence[float | None] | None (epoch deadlines, None for "due
#     now"; None as a whole when no send of the batch is delayed)
#   claimed: set[int], the indices to insert already claimed (claim on
#     delivery); the store removes from it those of sessions that have a
#     pending message, which must not be overtaken: the caller reads it
#     back after the commit
#   keys: Sequence[str | None] | None (idempotency keys; None as a whole when
#     no send has one)
#   key_retention: float, how long (seconds) a processed message's key still
#     refuses a duplicate
AppendBatch: TypeAlias = tuple[
    Sequence[str],
    Sequence[str | bytes],
    Sequence[float],
    Sequence[float | None] | None,
    set[int],
    Sequence[str | None] | None,
    float,
    Collection[int] | None,
]


@attrs.frozen
class DatabaseCounts:
    """Messages by state in a whole (shared) database, and how many its live
    processes acknowledged since they started."""

    pending: int  # delayed and retry-waiting ones included
    in_flight: int
    dead: int
    processed: int


class Claim:
    """What ``Store.claim_next`` found (read-only).

    ``message`` is the claimed message, or None. Without a message,
    ``wait_until`` is the epoch time at which the head may be retried, or
    None when the session has no ready work; ``alone`` says the head may
    only run alone (nothing else in flight in the system) and was not
    claimed. ``dead`` lists the messages dead-lettered on the way (their
    attempts were used up, or they could not be decoded). With a message,
    ``extra`` lists the fresh messages queued right behind it that were
    claimed with it (``bulk``, in order), ``seq`` is the seq of the last
    message claimed, and ``more`` says whether another message of the
    session waits behind that one. ``state`` is the session's state (JSON
    text) when it was asked for, and ``sent`` the (session, seq) of the
    messages the ack's outbox inserted.
    """

    __slots__ = (
        "alone",
        "dead",
        "extra",
        "message",
        "more",
        "sent",
        "seq",
        "state",
        "wait_until",
    )

    def __init__(
        self,
        message: Message | None,
        seq: int,
        wait_until: float | None,
        dead: tuple[int, ...],
        alone: bool = False,
    ) -> None:
        self.message = message
        self.seq = seq
        self.wait_until = wait_until
        self.dead = dead
        self.alone = alone
        self.more = False
        self.extra: list[Message] = []
        self.state: str | None = None
        self.sent: Sent | None = None


class Ack:
    """An acknowledgement that writes more than the deletion of its message.

    A plain ack is just the message id (an int); this is used when the
    handler changed ``ctx.state``, sent messages with ``ctx.send``, or the
    message has an idempotency key. Everything here commits in the same
    transaction as the deletion, or not at all (effectively-once).
    """

    __slots__ = ("at", "id", "key", "outbox", "session_id", "state")

    def __init__(
        self,
        message_id: int,
        session_id: str,
        state: str | None,
        outbox: list[tuple[str, str | bytes, float]] | None,
        key: str | None,
        at: float,
    ) -> None:
        self.at = at  # when the handler finished (epoch): state and key times
        self.id = message_id
        self.session_id = session_id
        self.state = state  # the new state's JSON, or None if unchanged
        self.outbox = outbox  # (session_id, encoded body, enqueued_at)
        self.key = key  # the message's idempotency key: mark it processed


class BatchAck(Ack):
    """The acknowledgement of a batch (a batched handler): ``id`` is its last message.

    ``earlier`` are the batch's other messages, in order: they are deleted,
    and their idempotency keys marked processed, in the transaction that
    deletes ``id`` and writes the state and the outbox, or not at all.
    """

    __slots__ = ("earlier",)

    def __init__(
        self,
        earlier: Sequence[Message],
        message_id: int,
        session_id: str,
        state: str | None,
        outbox: list[tuple[str, str | bytes, float]] | None,
        key: str | None,
        at: float,
    ) -> None:
        super().__init__(message_id, session_id, state, outbox, key, at)
        self.earlier = earlier

    @property
    def count(self) -> int:
        """How many messages this ack deletes."""
        return len(self.earlier) + 1


@attrs.frozen
class Opened:
    """What the store found when it opened the database."""

    pending: int  # messages pending or in flight (recovered ones included)
    dead: int
    recovered: int  # messages a dead process left in flight, now pending


@attrs.frozen
class StoreStatistics:
    """Counters of the store since it opened."""

    transactions: int
    operations: int
    largest_group: int
    queued_operations: int
    checkpoints: int  # WAL checkpoints between transactions (short, or past the limit)
    bulk_checkpoints: int  # WAL checkpoints beside the commits (the checkpoint thread)
    wal_pages: int  # pages in the WAL after the last commit


@attrs.frozen
class DueWork:
    """What ``Store.collect_due`` found.

    ``promoted``: the (session, seq) of each delayed message whose delay
    ended, in the order they entered their queues; ``retry_sessions``: the
    sessions whose head finished its retry wait; ``more``: more delayed
    messages are due than the limit allowed.
    """

    promoted: Sent
    retry_sessions: list[str]
    more: bool


@attrs.frozen
class Aborted:
    """What ``Store.abort`` found: the message's state and session.

    Deleted unless ``state`` is ``IN_FLIGHT`` (a handler runs it).
    """

    state: MessageState
    session_id: str


@attrs.frozen
class Purged:
    """What one ``Store.purge`` deleted: counts by former state, and the ids."""

    pending: int
    dead: int
    ids: list[int]


@attrs.frozen
class ControlRequest:
    """An open request of the control table, taken by the running system."""

    id: int
    command: str
    args: str  # a JSON object


# -- the command line's read views ---------------------------------------------


@attrs.frozen
class MessageCounts:
    """Messages by state. ``delayed`` and ``retry_waiting`` are pending ones
    that wait for their delay or a retry deadline; ``claimed`` are in flight
    in the database, handed ones included (see ``Claimed``)."""

    pending: int
    delayed: int
    retry_waiting: int
    claimed: int
    dead: int


@attrs.frozen
class Claimed:
    """The claimed messages whose handler has not started (handed to an actor).

    ``handed``: how many per session; ``handed_ids``: their ids. Every other
    claimed message is in flight (its handler started).
    """

    handed: dict[str, int]
    handed_ids: list[int]

    @property
    def count(self) -> int:
        return len(self.handed_ids)


@attrs.frozen
class SessionCounts:
    """One session's messages by state (``claimed`` includes handed ones).

    ``oldest_enqueued_at``: the send time of its oldest pending or claimed
    message (None if it has none); ``most_attempts``: the most attempts any
    of its messages has used, handed messages' claims not counted.
    """

    session_id: str
    pending: int
    claimed: int
    dead: int
    oldest_enqueued_at: float | None
    most_attempts: int


@attrs.frozen
class InFlight:
    """A claimed message whose handler started."""

    id: int
    session_id: str
    attempt: int
    enqueued_at: float


@attrs.frozen(kw_only=True)
class Member:
    """A process of a cluster, as its row says (``StoreViews.membership``).

    ``alive``: its membership lease is current by the database's clock (it
    renews it every quarter of its ``lease_ttl``; a clean stop ends it at
    once). ``buckets``: how many buckets it holds by a current lease.
    ``started_at``: when it joined (epoch seconds). ``heartbeat``: the last
    heartbeat its system wrote (JSON), None before the first.
    """

    id: str
    host: str
    pid: int
    alive: bool
    started_at: float
    buckets: int
    heartbeat: str | None


@attrs.frozen(kw_only=True)
class Membership:
    """The members of a database shared by a cluster, and its buckets.

    ``buckets``: how many the sessions are hashed into; ``members``: every
    process the database remembers (a gone one for some minutes), the live
    ones first, then by when they joined.
    """

    buckets: int
    members: list[Member]
