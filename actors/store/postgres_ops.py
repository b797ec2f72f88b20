"""Every write of the runtime on PostgreSQL, fenced by bucket leases.

The same operations as sqlite_ops.py, with the same contract (each runs in
the committer's transaction, returns plain data, is safe to run twice),
and one more rule: an operation that claims, acknowledges, fails, releases
or otherwise changes a session's queue first *fences* the session's bucket
in its own transaction (:meth:`Operations.fence`): the bucket row is
locked ``FOR KEY SHARE`` and must still name this process as its owner at
the epoch this process holds it by. A process that lost the bucket (it was
frozen or cut off past its lease, and another took the bucket over) has
its write refused: the operation does nothing and says so the way the
protocol allows (nothing claimed, a fail that finds the message "gone"),
and the lease keeper drops the bucket. The lock keeps a takeover out
until the write commits: another process takes a bucket only through
``FOR UPDATE SKIP LOCKED`` (postgres_leases.take), which that lock blocks,
and a fence that comes after a takeover reads the new epoch. So no write
of the old owner lands after the new owner began. (``FOR KEY SHARE``, not
``FOR SHARE``: the owner's own renewal, an update of ``lease_until`` that
changes no key, does not wait for its writes, nor they for it; with
``FOR SHARE`` a renewal and a transaction fencing two buckets deadlocked.)

Operators' changes (retry, abort, purge) and sends come from any process
and are not fenced: they only add work or remove work no handler holds.
What they add to a bucket this process does not own is announced with one
``NOTIFY`` per transaction, listing the buckets (never a notice per row:
a notice takes a lock at commit that serialises committers).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import psycopg

from .. import _clock
from .._codec import decode_body
from .._records import Message, new_message
from .blame import gave_up
from .postgres_ownership import Ownership
from .postgres_schema import DEAD
from .records import (
    Aborted,
    Ack,
    Appended,
    BatchAck,
    Claim,
    ControlRequest,
    DueWork,
    FailOutcome,
    MessageState,
    Purged,
    Sent,
)

NOTIFY_CHANNEL = "actors_work"
# The answers of ask() for another process: the payload names it.
REPLY_CHANNEL = "actors_reply"
# Outputs for another process's subscribers (payload: that process), and a
# change of who subscribes to what (payload: the member that changed).
OUTPUT_CHANNEL = "actors_output"
SUBSCRIBERS_CHANNEL = "actors_subs"
# System.kill() of a session another process runs (payload: the session).
KILL_CHANNEL = "actors_kill"
# A payload longer than this lists too many buckets: "*" (every owner looks).
_NOTIFY_MAX = 7000
# Ids are taken from the database's counter in blocks, so that most
# batches take theirs without a round trip.
ID_BLOCK = 4096

_FENCE = (
    "SELECT b.bucket, b.lease_until > now() + make_interval(secs => %s)"
    " FROM actors_buckets b JOIN unnest(%b::integer[], %b::bigint[]) AS m(bucket, epoch)"
    " ON b.bucket = m.bucket AND b.epoch = m.epoch WHERE b.owner = %s FOR KEY SHARE OF b"
)
_QUEUE = (
    "SELECT id, seq, attempts, body, raw, enqueued_at, not_before, last_error, crashed,"
    " alone, key, reply_to, state FROM actors_messages"
    " WHERE session_id = %s AND state < 2 AND seq IS NOT NULL ORDER BY seq LIMIT %s"
)
# The head (the first id) and the fresh messages behind it, claimed at once.
_CLAIM = (
    "UPDATE actors_messages SET state = 1, not_before = NULL, crashed = false,"
    " attempts = CASE WHEN id = %s THEN %s ELSE 1 END,"
    " alone = (id = %s AND %s) WHERE id = ANY(%b::bigint[])"
)
INSERT_MESSAGES = (
    "INSERT INTO actors_messages"
    " (id, session_id, bucket, seq, state, attempts, body, raw, enqueued_at, not_before, key,"
    " reply_to) SELECT * FROM unnest(%b::bigint[], %b::text[], %b::integer[], %b::bigint[],"
    " %b::smallint[], %b::integer[], %b::text[], %b::bytea[], %b::double precision[],"
    " %b::double precision[], %b::text[], %b::text[])"
)
# The same, run again after a lost connection: the first run may have
# committed after all. (Only then: an insert ON CONFLICT checks each row's
# key before inserting it, a cost per message.)
INSERT_MESSAGES_AGAIN = INSERT_MESSAGES + " ON CONFLICT (id) DO NOTHING"
# (A dead letter leaves its session's queue: no seq. See postgres_schema.DEAD.)
_DEAD = (
    "UPDATE actors_messages SET state = 2, seq = NULL, not_before = NULL, last_error = %s"
    " WHERE id = %s"
)
# An acked message's idempotency key is processed (its ack, and a batch's).
_KEY_DONE = (
    "UPDATE actors_keys SET done_at = %s WHERE session_id = %s AND key = %s AND message_id = %s"
)
# The open requests that no live member holds (result: the taker, as JSON).
_TAKE = (
    "UPDATE actors_control"
    " SET result = json_build_object('status', 'applying', 'member', %s::text)::text"
    " WHERE id IN (SELECT c.id FROM actors_control c WHERE c.done_at IS NULL AND (c.result IS NULL"
    " OR NOT EXISTS (SELECT 1 FROM actors_members m WHERE m.id = c.result::json->>'member'"
    " AND m.seen_until > now())) ORDER BY c.id LIMIT %s FOR UPDATE OF c SKIP LOCKED)"
    " RETURNING id, command, args"
)


class IdBlocks:
    """Fresh ids (and seqs) for both committers of a process, from the
    database's counter in blocks of ``ID_BLOCK`` (most batches take theirs
    without a round trip). One sequence for the process, so that a message
    sent after another one committed, by either committer, has the higher
    seq: causal order within a process, as on SQLite. (Any thread.)
    """

    def __init__(self, take_block: Callable[[int], int]) -> None:
        self._take_block = take_block  # reserves n ids in the database, returns the first
        self._lock = threading.Lock()
        self.next = 0
        self._last = 0  # the block is [next, _last)

    def take(self, n: int) -> int:
        """The first of ``n`` consecutive fresh ids."""
        with self._lock:
            if self._last - self.next < n:
                size = max(n, ID_BLOCK)
                self.next = self._take_block(size)
                self._last = self.next + size
            first = self.next
            self.next += n
            return first


def notice_payload(buckets: Sequence[int], *, delayed: bool) -> str:
    """A notice's payload listing buckets ("*": all), "d" first if delayed
    messages came (the timer looks). (Sessions: see Operations.notice.)"""
    payload = ",".join(map(str, buckets))
    if len(payload) > _NOTIFY_MAX:
        payload = "*"
    return "d" + payload if delayed else payload


def announce(conn: psycopg.Connection[Any], buckets: Sequence[int], *, delayed: bool) -> None:
    """Tell the owners of ``buckets`` to look for work there (one notice)."""
    conn.execute(
        "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, notice_payload(buckets, delayed=delayed))
    )


class Operations:
    """The runtime's writes on one connection (the committer's: see the module)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        ids: IdBlocks,
        own: Ownership,
        claim_margin: float,
    ) -> None:
        self.conn = conn
        self._ids = ids
        # The ids this transaction took, in order; a transaction run again
        # after a lost connection takes the same ones (its inserts skip rows
        # that the first run may have committed after all).
        self._taken: list[tuple[int, int]] = []
        self._replay: list[tuple[int, int]] = []
        self._rerun = False
        self.again = False
        self.own = own
        self._member = own.member
        # A claim needs this many seconds of lease left: a process that
        # cannot renew stops starting handlers before its lease can expire.
        self._claim_margin = claim_margin
        self.clock_now: Callable[[], float] = _clock.wall_time
        # {message id: its bucket} for the messages this process claimed: an
        # ack by id is fenced by its bucket without a lookup.
        self.bucket_by_id: dict[int, int] = {}
        # Per transaction (reset by begin()): the fence's answers
        # ({bucket: lease fresh enough to claim}, absent: refused), the
        # buckets to announce, and the acks made (actors_members.processed).
        self._held: dict[int, bool] = {}
        self._refused: set[int] = set()
        self.announce: set[int] = set()
        # The sessions and buckets of the messages appended, unless delayed
        # (see notice), and buckets announced without their sessions.
        self._sent: list[tuple[list[str], list[int]]] = []
        self._unlisted: set[int] = set()
        self.delayed = False  # the notice says delayed messages came (the timer looks)
        self.acked = 0
        # Acks committed since start, written on the member row by the lease
        # keeper (not by every ack's transaction: the row is the keeper's
        # too, and a hot one).
        self.processed = 0
        self.answered: set[str] = set()  # members to tell of replies written
        self.fed: set[str] = set()  # members to tell of outputs written
        # {message id: the member whose ask() waits for it}, for claimed
        # messages asked by another process (written here, read and popped
        # on the trio thread: single dict operations).
        self.remote_asks: dict[int, str] = {}

    # -- transactions (PgTransactions) ------------------------------------------

    def begin(self) -> None:
        self._replay = self._taken if self._rerun else []
        self.again = self._rerun  # (the transaction runs again: see INSERT_MESSAGES_AGAIN)
        self._taken = []
        self._rerun = False
        self._held.clear()
        self._refused.clear()
        self.announce = set()
        self._sent = []
        self._unlisted = set()
        self.delayed = False
        self.acked = 0
        self.answered = set()
        self.fed = set()

    def committed(self) -> None:
        """The transaction committed: count its acks (see processed)."""
        self.processed += self.acked

    def rewind(self) -> None:
        """The transaction is to run again (see begin)."""
        self._rerun = True

    def finish(self) -> None:
        """In the transaction, after its operations: the counts and one notice."""
        others = self.elsewhere()
        if others:
            self.conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, self.notice(others)))
        for member in self.answered:
            self.conn.execute("SELECT pg_notify(%s, %s)", (REPLY_CHANNEL, member))
        for member in self.fed:
            self.conn.execute("SELECT pg_notify(%s, %s)", (OUTPUT_CHANNEL, member))

    def elsewhere(self) -> list[int]:
        """The buckets this transaction added work to that this process does not
        run now (not held, or being handed over): their owners must be told."""
        owned, leaving = self.own.owned, self.own.leaving
        return sorted(b for b in self.announce if b not in owned or b in leaving)

    def notice(self, others: list[int]) -> str:
        """The payload of this transaction's notice of work in ``others``.

        The sessions, when the transaction knows them all and they fit
        ("s" and a JSON list): the owner then pokes their actors without
        reading anything (a read of the buckets' waiting sessions cost the
        server about a fifth of its time per message under load). Else the
        buckets (notice_payload), and the owner reads which sessions wait.
        """
        if self.delayed or not self._unlisted.isdisjoint(others):
            return notice_payload(others, delayed=self.delayed)
        wanted = set(others)
        sessions = {s for ss, bs in self._sent for s, b in zip(ss, bs, strict=True) if b in wanted}
        payload = "s" + json.dumps(sorted(sessions))
        if len(payload) > _NOTIFY_MAX:
            return notice_payload(others, delayed=False)
        return payload

    def take_ids(self, n: int) -> int:
        """The first of ``n`` consecutive fresh ids (and seqs)."""
        replay = self._replay
        first = replay.pop(0)[0] if replay and replay[0][1] == n else self._ids.take(n)
        self._taken.append((first, n))
        return first

    @property
    def next_seq(self) -> int:
        return self._ids.next

    # -- the fence ------------------------------------------------------------

    def fence(self, buckets: Iterable[int], claiming: bool = False) -> set[int]:
        """The buckets of ``buckets`` this transaction may write for (see the module).

        ``claiming``: also a lease fresh enough to start a handler, and not
        being handed over. A bucket the database gives another owner is
        reported lost (the keeper checks, and drops it).
        """
        held = self._held
        wanted = set(buckets)
        ask = [b for b in wanted if b not in held and b not in self._refused]
        if ask:
            owned = self.own.owned
            known = [b for b in ask if b in owned]
            self._refused.update(b for b in ask if b not in owned)
            if known:
                rows = self.conn.execute(
                    _FENCE, (self._claim_margin, known, [owned[b] for b in known], self._member)
                ).fetchall()
                for b, fresh in rows:
                    held[b] = bool(fresh)
                lost = {b for b in known if b not in held}
                if lost:
                    self._refused |= lost
                    self.own.fenced()
        if claiming:
            leaving = self.own.leaving
            return {b for b in wanted if held.get(b) and b not in leaving}
        return {b for b in wanted if b in held}

    def _bucket_of_id(self, message_id: int) -> int | None:
        b = self.bucket_by_id.get(message_id)
        if b is None:
            row = self.conn.execute(
                "SELECT bucket FROM actors_messages WHERE id = %s", (message_id,)
            ).fetchone()
            b = None if row is None else int(row[0])
        return b

    # -- sends ------------------------------------------------------------

    def append(
        self,
        sessions: Sequence[str],
        bodies: Sequence[str | bytes],
        enqueued: Sequence[float],
        not_before: Sequence[float | None] | None,
        claimed: set[int],
        keys: Sequence[str | None] | None,
        key_retention: float,
        asked: Collection[int] | None = None,
    ) -> Appended:
        """Insert a batch in order (an AppendBatch's fields); see ``Store.append``."""
        n = len(sessions)
        first = self.take_ids(n)
        bucket = self.own.bucket
        buckets = [bucket(s) for s in sessions]
        duplicates: dict[int, int] | None = None
        if keys is not None:
            duplicates = self._duplicates(sessions, enqueued, keys, key_retention, first)
        if claimed:
            self._narrow_claimed(sessions, buckets, claimed)
        ids, states, attempts, seqs = [], [], [], []
        for i in range(n):
            if duplicates and i in duplicates:
                continue
            ids.append(first + i)
            c = 1 if i in claimed else 0
            states.append(c)
            attempts.append(c)
            delayed = not_before is not None and not_before[i] is not None
            seqs.append(None if delayed else first + i)
        kept = [i - first for i in ids]
        kept_sessions = [sessions[i] for i in kept]
        kept_buckets = [buckets[i] for i in kept]
        self._insert(
            (
                ids,
                kept_sessions,
                kept_buckets,
                seqs,
                states,
                attempts,
                [b if isinstance(b, str) else None for b in (bodies[i] for i in kept)],
                [b if isinstance(b, bytes) else None for b in (bodies[i] for i in kept)],
                [enqueued[i] for i in kept],
                [not_before[i] for i in kept] if not_before is not None else [None] * len(kept),
                [keys[i] for i in kept] if keys is not None else [None] * len(kept),
                [self._member if asked and i in asked else None for i in kept],
            ),
        )
        for i in claimed:
            self.bucket_by_id[first + i] = buckets[i]
        self.announce.update(kept_buckets)
        if not_before is not None:
            self.delayed = True
        else:
            self._sent.append((kept_sessions, kept_buckets))
        return first, duplicates

    def _insert(self, columns: tuple[list[Any], ...]) -> None:
        """Insert the messages (``INSERT_MESSAGES``'s arrays, one per column)."""
        self.conn.execute(INSERT_MESSAGES_AGAIN if self.again else INSERT_MESSAGES, columns)

    def _keys_read(self) -> None:
        """The keys of a batch are about to be read and recorded (see SendOperations)."""

    def _narrow_claimed(
        self, sessions: Sequence[str], buckets: list[int], claimed: set[int]
    ) -> None:
        """Remove from ``claimed`` what must be inserted pending: a session with a
        message waiting (it must not be overtaken) or a bucket not held."""
        ok = self.fence({buckets[i] for i in claimed}, claiming=True)
        claimed.difference_update([i for i in claimed if buckets[i] not in ok])
        if not claimed:
            return
        wanted = list({sessions[i] for i in claimed})
        busy = {
            row[0]
            for row in self.conn.execute(
                "SELECT DISTINCT session_id FROM actors_messages WHERE session_id = ANY(%s)"
                " AND state = 0 AND seq IS NOT NULL",
                (wanted,),
            )
        }
        if busy:
            claimed.difference_update([i for i in claimed if sessions[i] in busy])

    def _duplicates(
        self,
        sessions: Sequence[str],
        enqueued: Sequence[float],
        keys: Sequence[str | None],
        key_retention: float,
        first: int,
    ) -> dict[int, int]:
        """Which keyed sends were sent before (index: the first message's id);
        records the keys of the others. Row by row: a key repeated within the
        batch is a duplicate of its first."""
        self._keys_read()
        conn = self.conn
        duplicates: dict[int, int] = {}
        for i, key in enumerate(keys):
            if key is None:
                continue
            row = conn.execute(
                "SELECT message_id, done_at FROM actors_keys WHERE session_id = %s AND key = %s",
                (sessions[i], key),
            ).fetchone()
            if row is not None and (row[1] is None or row[1] >= enqueued[i] - key_retention):
                duplicates[i] = int(row[0])
                continue
            conn.execute(
                "INSERT INTO actors_keys (session_id, key, message_id, done_at)"
                " VALUES (%s, %s, %s, NULL) ON CONFLICT (session_id, key)"
                " DO UPDATE SET message_id = EXCLUDED.message_id, done_at = NULL",
                (sessions[i], key, first + i),
            )
        return duplicates

    # -- claims and acks ----------------------------------------------------

    def claim_next(
        self,
        session_id: str,
        ack: int | Ack | None,
        now: float,
        max_attempts: int,
        alone: bool,
        want_state: bool,
        bulk: int,
    ) -> Claim:
        """Ack ``ack``, then claim the session's head (see ``Store.claim_next``)."""
        sent = self.ack(ack) if ack is not None else None
        b = self.own.bucket(session_id)
        if not self.fence((b,), claiming=True):
            claim = Claim(None, 0, None, ())
        else:
            claim = self._claim_head(session_id, b, now, max_attempts, alone, bulk)
        claim.sent = sent
        if want_state:
            claim.state = self.load_state(session_id)
        return claim

    def _claim_head(
        self, session_id: str, bucket: int, now: float, max_attempts: int, alone: bool, bulk: int
    ) -> Claim:
        """As sqlite_claim.claim_head and claim_following, on this connection, in
        two statements: the head and what follows it read at once (``bulk`` + 2
        rows: one more says whether more wait), and every claim one update."""
        conn = self.conn
        dead: list[int] = []
        while True:
            rows: list[Any] = conn.execute(_QUEUE, (session_id, bulk + 2), binary=True).fetchall()
            if not rows:
                return Claim(None, 0, None, tuple(dead))
            (msg_id, seq, attempts, body, raw, enqueued_at, not_before, last_error, crashed,
             ran_alone, key, reply_to, _state) = rows[0]  # fmt: skip
            if not_before is not None and not_before > now:
                return Claim(None, seq, not_before, tuple(dead))
            if attempts >= max_attempts:
                conn.execute(_DEAD, (gave_up(attempts, crashed, ran_alone, last_error), msg_id))
                dead.append(msg_id)
                continue
            if crashed and attempts == max_attempts - 1 and not alone:
                return Claim(None, seq, None, tuple(dead), alone=True)
            try:
                decoded = decode_body(body if body is not None else raw)
            except ValueError as exc:
                conn.execute(_DEAD, (f"cannot decode message body: {exc}", msg_id))
                dead.append(msg_id)
                continue
            if reply_to is not None and reply_to != self._member:
                self.remote_asks[msg_id] = reply_to
            claim = Claim(
                Message(
                    id=msg_id,
                    session_id=session_id,
                    body=decoded,
                    attempt=attempts + 1,
                    enqueued_at=enqueued_at,
                    key=key,
                ),
                seq,
                None,
                tuple(dead),
            )
            claim.more = len(rows) > 1
            if bulk > 0 and claim.more:
                self._take_following(claim, session_id, rows[1:], bulk)
            ids = [msg_id, *(m.id for m in claim.extra)]
            conn.execute(_CLAIM, (msg_id, attempts + 1, msg_id, alone, ids))
            for i in ids:
                self.bucket_by_id[i] = bucket
            return claim

    def _take_following(self, claim: Claim, session_id: str, rows: list[Any], limit: int) -> None:
        """The fresh messages right behind the head, as sqlite_claim.claim_following
        (claimed with it by the caller's update)."""
        extra = claim.extra
        claim.more = len(rows) > limit
        for (msg_id, seq, attempts, body, raw, enqueued_at, _, _, crashed, _, key, reply_to,
             state) in rows[:limit]:  # fmt: skip
            if state or attempts or crashed:
                claim.more = True
                break
            try:
                decoded = decode_body(body if body is not None else raw)
            except ValueError:
                claim.more = True
                break
            claim.seq = seq
            extra.append(new_message(msg_id, session_id, decoded, 1, enqueued_at, key))
            if reply_to is not None and reply_to != self._member:
                self.remote_asks[msg_id] = reply_to

    @property
    def has_state(self) -> bool:
        """Always: other processes write state too."""
        return True

    def load_state(self, session_id: str) -> str | None:
        """The session's state (JSON text), or None if it has none."""
        row = self.conn.execute(
            "SELECT value FROM actors_state WHERE session_id = %s", (session_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def ack(self, ack: int | Ack) -> Sent | None:
        """Delete a processed message (and write its Ack); returns the outbox's (session, seq)."""
        if type(ack) is int:
            self._ack_ids([ack])
            return None
        assert isinstance(ack, Ack)
        return self._apply_ack(ack)

    def ack_box(self, acks: list[int | Ack]) -> tuple[int, Sent | None]:
        """Write a box of acks (see ack_soon); returns (count, the outboxes' (session, seq))."""
        plain = [a for a in acks if type(a) is int]
        if plain:
            self._ack_ids(plain)
        sent: Sent | None = None
        count = len(acks)
        if len(plain) != count:
            for ack in acks:
                if type(ack) is not int:
                    assert isinstance(ack, Ack)
                    if type(ack) is BatchAck:
                        count += len(ack.earlier)
                    more = self._apply_ack(ack)
                    if more:
                        sent = (sent or []) + more
        return count, sent

    def _ack_ids(self, ids: list[int]) -> None:
        buckets = {i: self._bucket_of_id(i) for i in ids}
        ok = self.fence({b for b in buckets.values() if b is not None})
        done = [i for i, b in buckets.items() if b in ok]
        if done:
            self.conn.execute("DELETE FROM actors_messages WHERE id = ANY(%b::bigint[])", (done,))
            self.acked += len(done)
            for i in done:
                self.bucket_by_id.pop(i, None)

    def _apply_ack(self, ack: Ack) -> Sent | None:
        """Delete the acked message, and write what its handler changed (fenced)."""
        conn = self.conn
        b = self.own.bucket(ack.session_id)
        if not self.fence((b,)):
            return None
        now = ack.at
        if type(ack) is BatchAck:
            self._delete_batch(ack)
        else:
            conn.execute("DELETE FROM actors_messages WHERE id = %s", (ack.id,))
            self.bucket_by_id.pop(ack.id, None)
            self.acked += 1
        if ack.state is not None:
            conn.execute(
                "INSERT INTO actors_state (session_id, bucket, value, updated_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (session_id)"
                " DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
                (ack.session_id, b, ack.state, now),
            )
        if ack.key is not None:
            conn.execute(
                _KEY_DONE,
                (now, ack.session_id, ack.key, ack.id),
            )
        if not ack.outbox:
            return None
        sessions = [s for s, _, _ in ack.outbox]
        first, _ = self.append(
            sessions,
            [body for _, body, _ in ack.outbox],
            [t for _, _, t in ack.outbox],
            None,
            set(),
            None,
            0.0,
        )
        return [(s, first + i) for i, s in enumerate(sessions)]

    def _delete_batch(self, ack: BatchAck) -> None:
        """Delete a batch's messages (fenced by the caller: one session, one bucket),
        and mark the keys of its earlier ones processed (the last one's is
        ``ack.key``, marked by the caller)."""
        conn = self.conn
        ids = [m.id for m in ack.earlier]
        ids.append(ack.id)
        conn.execute("DELETE FROM actors_messages WHERE id = ANY(%b::bigint[])", (ids,))
        for i in ids:
            self.bucket_by_id.pop(i, None)
        self.acked += len(ids)
        for m in ack.earlier:
            if m.key is not None:
                conn.execute(
                    _KEY_DONE,
                    (ack.at, ack.session_id, m.key, m.id),
                )

    def fail(self, message_id: int, error: str, retry_at: float, max_attempts: int) -> FailOutcome:
        """Record a failed attempt: back to pending until ``retry_at``, or dead."""
        conn = self.conn
        row = conn.execute(
            "SELECT attempts, bucket FROM actors_messages WHERE id = %s", (message_id,)
        ).fetchone()
        if row is None or not self.fence((row[1],)):
            return "gone"
        self.bucket_by_id.pop(message_id, None)
        if row[0] >= max_attempts:
            conn.execute(
                "UPDATE actors_messages SET state = 2, seq = NULL, not_before = NULL,"
                " last_error = %s, alone = false WHERE id = %s",
                (error, message_id),
            )
            return "dead"
        conn.execute(
            "UPDATE actors_messages SET state = 0, not_before = %s, last_error = %s,"
            " alone = false WHERE id = %s",
            (retry_at, error, message_id),
        )
        return "retry"

    def release(self, message_id: int, uncount: bool, crashed: bool) -> None:
        """Put an in-flight message back to pending, at the head of its queue."""
        b = self._bucket_of_id(message_id)
        if b is None or not self.fence((b,)):
            return
        self.bucket_by_id.pop(message_id, None)
        self.conn.execute(
            "UPDATE actors_messages SET state = 0, attempts = greatest(attempts - %s, 0),"
            " crashed = %s WHERE id = %s AND state = 1",
            (1 if uncount else 0, crashed, message_id),
        )

    def release_many(self, message_ids: list[int]) -> None:
        """Give back claims whose handler never started (claimed on delivery, unused)."""
        buckets = {i: self._bucket_of_id(i) for i in message_ids}
        ok = self.fence({b for b in buckets.values() if b is not None})
        ids = [i for i, b in buckets.items() if b in ok]
        if not ids:
            return
        for i in ids:
            self.bucket_by_id.pop(i, None)
        self.conn.execute(
            "UPDATE actors_messages SET state = 0, attempts = greatest(attempts - 1, 0)"
            " WHERE id = ANY(%b::bigint[]) AND state = 1",
            (ids,),
        )

    def nothing(self) -> None:
        """Write nothing: its completion says every operation before it committed."""

    def defer_head(self, session_id: str, until: float) -> bool:
        """Hold the session's head until ``until`` (a suspended session). False if no head."""
        if not self.fence((self.own.bucket(session_id),)):
            return False
        row = self.conn.execute(_QUEUE, (session_id, 1)).fetchone()
        if row is None:
            return False
        self.conn.execute(
            "UPDATE actors_messages SET not_before = greatest(coalesce(not_before, 0), %s)"
            " WHERE id = %s",
            (until, row[0]),
        )
        return True

    # -- the timer and the waiting line (this process's buckets) -------------------

    def _mine(self) -> list[int]:
        leaving = self.own.leaving
        return [b for b in self.own.owned if b not in leaving]

    def next_due(self, after: float) -> float | None:
        """The earliest delay or retry deadline later than ``after``, in owned buckets."""
        row = self.conn.execute(
            "SELECT min(not_before) FILTER (WHERE seq IS NULL),"
            " min(not_before) FILTER (WHERE not_before > %s)"
            " FROM actors_messages WHERE not_before IS NOT NULL AND state = 0"
            " AND bucket = ANY(%s)",
            (after, self._mine()),
        ).fetchone()
        values = [v for v in (row or ()) if v is not None]
        return min(values) if values else None

    def collect_due(self, after: float, now: float, limit: int) -> DueWork:
        """Deadlines that passed, in owned buckets: promote delayed messages into their queues."""
        conn = self.conn
        mine = self._mine()
        due = conn.execute(
            "SELECT id, session_id, bucket FROM actors_messages WHERE not_before <= %s"
            " AND seq IS NULL AND state = 0 AND bucket = ANY(%s) ORDER BY not_before, id LIMIT %s",
            (now, mine, limit + 1),
        ).fetchall()
        ok = self.fence({row[2] for row in due[:limit]})
        promoted: Sent = []
        for msg_id, session_id, b in due[:limit]:
            if b in ok:
                seq = self.take_ids(1)
                conn.execute(
                    "UPDATE actors_messages SET seq = %s, not_before = NULL WHERE id = %s",
                    (seq, msg_id),
                )
                promoted.append((session_id, seq))
        sessions = [
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT session_id FROM actors_messages WHERE not_before > %s"
                " AND not_before <= %s AND seq IS NOT NULL AND state = 0 AND bucket = ANY(%s)",
                (after, now, mine),
            )
        ]
        return DueWork(promoted=promoted, retry_sessions=sessions, more=len(due) > limit)

    def sessions_with_work(self, limit: int, exclude: frozenset[str]) -> list[tuple[str, int]]:
        """Sessions of owned buckets with queued work, oldest head first, not ``exclude``."""
        rows = self.conn.execute(
            "SELECT session_id, min(seq) AS head FROM actors_messages"
            " WHERE state < 2 AND seq IS NOT NULL AND bucket = ANY(%s)"
            " GROUP BY session_id ORDER BY head LIMIT %s",
            (self._mine(), limit + len(exclude)),
        ).fetchall()
        return [(s, head) for s, head in rows if s not in exclude][:limit]

    def oldest_due(self, now: float) -> float | None:
        """The ``enqueued_at`` of the oldest message that is due or in flight (any bucket)."""
        row = self.conn.execute(
            "SELECT min(enqueued_at) FROM actors_messages WHERE state < 2 AND seq IS NOT NULL"
            " AND (not_before IS NULL OR not_before <= %s)",
            (now,),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- operators' changes (any process) ---------------------------------------

    def retry_dead(self, message_id: int | None) -> Sent:
        """Requeue one dead letter, or all, at the back of their sessions' queues."""
        conn = self.conn
        if message_id is None:
            rows = conn.execute(
                f"SELECT id, session_id, bucket FROM actors_messages WHERE {DEAD} ORDER BY id"
                " FOR UPDATE"
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT id, session_id, bucket FROM actors_messages WHERE state = 2 AND id = %s"
                " FOR UPDATE",
                (message_id,),
            ).fetchall()
        if not rows:
            return []
        first = self.take_ids(len(rows))
        conn.execute(
            "UPDATE actors_messages m SET state = 0, attempts = 0, seq = u.seq,"
            " not_before = NULL, last_error = NULL, crashed = false, alone = false"
            " FROM unnest(%s::bigint[], %s::bigint[]) AS u(id, seq) WHERE m.id = u.id",
            ([r[0] for r in rows], [first + i for i in range(len(rows))]),
        )
        self.announce.update(r[2] for r in rows)
        self._unlisted.update(r[2] for r in rows)
        return [(str(r[1]), first + i) for i, r in enumerate(rows)]

    def abort(self, message_id: int, unstarted: bool) -> Aborted | None:
        """Delete a pending or dead message (see ``Store.abort``)."""
        conn = self.conn
        row = conn.execute(
            "SELECT state, session_id, key FROM actors_messages WHERE id = %s FOR UPDATE",
            (message_id,),
        ).fetchone()
        if row is None:
            return None
        state, session_id, key = MessageState(row[0]), str(row[1]), row[2]
        if unstarted and state is MessageState.IN_FLIGHT:
            state = MessageState.PENDING
        if state is not MessageState.IN_FLIGHT:
            conn.execute("DELETE FROM actors_messages WHERE id = %s", (message_id,))
            self.bucket_by_id.pop(message_id, None)
            if key is not None:
                conn.execute(
                    "DELETE FROM actors_keys WHERE session_id = %s AND key = %s"
                    " AND message_id = %s",
                    (session_id, key, message_id),
                )
        return Aborted(state=state, session_id=session_id)

    def purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Purged:
        """Delete up to ``limit`` messages that are not in flight (see ``Store.purge``)."""
        where = DEAD if dead_only else "state != 1"
        params: list[Any] = []
        if session_id is not None:
            where += " AND session_id = %s"
            params.append(session_id)
        if before is not None:
            where += " AND enqueued_at < %s"
            params.append(before)
        rows = self.conn.execute(
            f"DELETE FROM actors_messages WHERE id IN (SELECT id FROM actors_messages"
            f" WHERE {where} ORDER BY id LIMIT %s FOR UPDATE)"
            " RETURNING id, session_id, state, key",
            (*params, limit),
        ).fetchall()
        rows.sort()
        keyed = [(s, k, i) for i, s, _, k in rows if k is not None]
        if keyed:
            self.conn.cursor().executemany(
                "DELETE FROM actors_keys WHERE session_id = %s AND key = %s AND message_id = %s",
                keyed,
            )
        dead = sum(1 for row in rows if row[2] == MessageState.DEAD)
        return Purged(pending=len(rows) - dead, dead=dead, ids=[int(row[0]) for row in rows])

    def sweep_keys(self, before: float, limit: int) -> int:
        """Forget idempotency keys whose message was processed before ``before``."""
        cur = self.conn.execute(
            "DELETE FROM actors_keys WHERE (session_id, key) IN (SELECT session_id, key"
            " FROM actors_keys WHERE done_at < %s LIMIT %s FOR UPDATE SKIP LOCKED)",
            (before, limit),
        )
        return max(cur.rowcount, 0)

    # -- answers of ask() across processes ---------------------------------------

    def post_replies(self, replies: list[tuple[int, str, str]]) -> None:
        """Write answers (message id, asking member, JSON) for other processes' asks."""
        self.conn.cursor().executemany(
            "INSERT INTO actors_replies (message_id, asker, value) VALUES (%s, %s, %s)"
            " ON CONFLICT (message_id) DO NOTHING",
            replies,
        )
        self.answered.update(asker for _, asker, _ in replies)

    def post_kill(self, session_id: str) -> None:
        """Ask the owner of ``session_id`` to kill its actor."""
        self.conn.execute("SELECT pg_notify(%s, %s)", (KILL_CHANNEL, session_id))

    def post_outputs(self, outputs: list[tuple[str, str, str]]) -> None:
        """Write outputs (member, session, JSON) for other processes' subscribers."""
        self.conn.cursor().executemany(
            "INSERT INTO actors_outputs (member, session_id, value) VALUES (%s, %s, %s)", outputs
        )
        self.fed.update(member for member, _, _ in outputs)

    # -- heartbeat and control table -------------------------------------------

    def heartbeat(self, value: str) -> None:
        """Write this process's heartbeat (JSON) on its member row."""
        self.conn.execute(
            "UPDATE actors_members SET heartbeat = %s WHERE id = %s", (value, self._member)
        )

    def take_control(self, limit: int) -> list[ControlRequest]:
        """The open control requests, oldest first, marked taken (see ``Store.take_control``).

        Marked with the member that takes it: another member takes a
        request only if no live member holds it (nobody took it, or its
        taker died), else every member would apply what one is applying.
        """
        rows = self.conn.execute(_TAKE, (self._member, limit)).fetchall()
        rows.sort()
        return [ControlRequest(id=int(i), command=str(c), args=str(a)) for i, c, a in rows]

    def finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None:
        """Write a control request's outcome; forget requests done before ``forget_before``."""
        self.conn.execute(
            "UPDATE actors_control SET done_at = %s, result = %s WHERE id = %s",
            (done_at, result, request_id),
        )
        self.conn.execute("DELETE FROM actors_control WHERE done_at < %s", (forget_before,))
