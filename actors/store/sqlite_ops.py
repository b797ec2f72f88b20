"""Every write of the runtime, as operations the committer runs on the connection.

Each operation runs inside the committer's transaction, returns plain data
(or a record), raises for nothing but a failing database, and is safe to
run twice: a failed group is rolled back and its operations run again, one
at a time (see committer.py).

Hot statements are set-based: a batch is inserted by multi-row ``VALUES``
statements, a box of acks deleted by one statement over a JSON array, and
the pending check of a batch's sessions is one query, so a transaction is a
handful of SQLite calls, not a few per message.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import apsw

from .. import _clock
from .._codec import encode_json as _json_array
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
from .sqlite_claim import HEAD, claim_head
from .sqlite_schema import HEARTBEAT_KEY, NOTE_WAIT, one

# Which sessions of a batch (a JSON array) have a message waiting in the
# database (not claimed). The terms of messages_queue's WHERE are spelled
# out, so that SQLite uses that partial index: it does not see that
# state = 0 implies state < 2, and would scan the whole table.
PENDING_ANY = (
    "SELECT value FROM json_each(?) WHERE EXISTS (SELECT 1 FROM messages"
    " WHERE session_id = value AND state < 2 AND seq IS NOT NULL AND state = 0)"
)
DELETE_IDS = "DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))"
# An acked message's idempotency key is processed (its ack, and a batch's).
_KEY_DONE = "UPDATE keys SET done_at = ? WHERE session_id = ? AND key = ? AND message_id = ?"

_INSERT_COLUMNS = 7
_INSERT_SQL: dict[int, str] = {}
# Rows per INSERT statement: a batch is cut greedily into these, so that
# only five statements are ever prepared (and stay in apsw's cache).
_INSERT_CHUNKS = (256, 64, 16, 4, 1)


def _insert_sql(rows: int) -> str:
    sql = _INSERT_SQL.get(rows)
    if sql is None:
        sql = _INSERT_SQL[rows] = (
            "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
            " VALUES " + ",".join(["(?,?,?,?,?,?,?)"] * rows)
        )
    return sql


def _insert_rows(db: apsw.Connection, values: list[Any]) -> None:
    """Insert rows given flat, ``_INSERT_COLUMNS`` values each, a few statements in all."""
    rows = len(values) // _INSERT_COLUMNS
    at = 0
    for chunk in _INSERT_CHUNKS:
        while rows - at >= chunk:
            db.execute(
                _insert_sql(chunk),
                values[at * _INSERT_COLUMNS : (at + chunk) * _INSERT_COLUMNS],
            )
            at += chunk


class Operations:
    """The runtime's writes on one connection (the committer's: see the module)."""

    def __init__(self, db: apsw.Connection, next_seq: int, has_state: bool) -> None:
        self.db = db
        # The next id and seq (one counter); written to ``meta`` with the
        # transaction that moved it (SqliteTransactions.finish).
        self.next_seq = next_seq
        self._has_state = has_state  # whether any session has state (skip the lookup if not)
        # The epoch time of the running system (Store.use_clock): when a
        # wait is written (see sqlite_schema.bound_waits).
        self.clock_now: Callable[[], float] = _clock.wall_time

    @property
    def has_state(self) -> bool:
        """Whether any session may have state (set before its write commits)."""
        return self._has_state

    def _take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

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
        """Insert a batch in order (an AppendBatch's fields); see ``Store.append``.

        ``asked`` is not written: one process owns the file, and its asks
        wait in memory."""
        db = self.db
        first = self.next_seq
        self.next_seq += len(sessions)
        if not_before is not None and enqueued:
            db.execute(NOTE_WAIT, (max(enqueued),))  # (the delays' writing time: see bound_waits)
        if keys is not None:
            return first, self._append_keyed(
                first, sessions, bodies, enqueued, not_before, keys, key_retention
            )
        if claimed:
            self._drop_overtaking(sessions, claimed)
        if not_before is None:
            # (id, session_id, seq, state, attempts, body, enqueued_at), flat:
            # claimed rows are in flight with their first attempt counted.
            values: list[Any] = []
            if claimed:
                for i, (s, b, t) in enumerate(zip(sessions, bodies, enqueued, strict=True)):
                    c = 1 if i in claimed else 0
                    values += (first + i, s, first + i, c, c, b, t)
            else:
                for i, (s, b, t) in enumerate(zip(sessions, bodies, enqueued, strict=True)):
                    values += (first + i, s, first + i, 0, 0, b, t)
            _insert_rows(db, values)
        else:
            db.executemany(
                "INSERT INTO messages"
                " (id, session_id, seq, state, attempts, body, enqueued_at, not_before)"
                " VALUES (?, ?, ?, 0, 0, ?, ?, ?)",
                (
                    (first + i, s, None if d is not None else first + i, b, t, d)
                    for i, (s, b, t, d) in enumerate(
                        zip(sessions, bodies, enqueued, not_before, strict=True)
                    )
                ),
            )
        return first, None

    def _drop_overtaking(self, sessions: Sequence[str], claimed: set[int]) -> None:
        """Remove from ``claimed`` the indices of sessions that have pending messages."""
        wanted = list({sessions[i] for i in claimed})
        busy = {row[0] for row in self.db.execute(PENDING_ANY, (_json_array(wanted),))}
        if busy:
            claimed.difference_update([i for i in claimed if sessions[i] in busy])

    def _append_keyed(
        self,
        first: int,
        sessions: Sequence[str],
        bodies: Sequence[str | bytes],
        enqueued: Sequence[float],
        not_before: Sequence[float | None] | None,
        keys: Sequence[str | None],
        key_retention: float,
    ) -> dict[int, int]:
        # A batch with keys goes row by row: each key is looked up after the
        # rows before it were inserted, so duplicates within a batch are
        # found too. (Never claimed on delivery: the router leaves them out.)
        db = self.db
        duplicates: dict[int, int] = {}
        for i, session_id in enumerate(sessions):
            key = keys[i]
            msg_id = first + i
            if key is not None:
                row = db.execute(
                    "SELECT message_id, done_at FROM keys WHERE session_id = ? AND key = ?",
                    (session_id, key),
                ).fetchone()
                if row is not None and (row[1] is None or row[1] >= enqueued[i] - key_retention):
                    duplicates[i] = int(row[0])
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO keys (session_id, key, message_id, done_at)"
                    " VALUES (?, ?, ?, NULL)",
                    (session_id, key, msg_id),
                )
            delay = not_before[i] if not_before is not None else None
            db.execute(
                "INSERT INTO messages"
                " (id, session_id, seq, state, attempts, body, enqueued_at, not_before, key)"
                " VALUES (?, ?, ?, 0, 0, ?, ?, ?, ?)",
                (
                    msg_id,
                    session_id,
                    None if delay is not None else msg_id,
                    bodies[i],
                    enqueued[i],
                    delay,
                    key,
                ),
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
        """Ack ``ack`` (delete it), then claim the session's head (see ``Store.claim_next``)."""
        sent = self.ack(ack) if ack is not None else None
        claim = claim_head(self.db, session_id, now, max_attempts, alone, bulk)
        claim.sent = sent
        if want_state:
            claim.state = self.load_state(session_id)
        return claim

    def load_state(self, session_id: str) -> str | None:
        """The session's state (JSON text), or None if it has none."""
        if not self._has_state:
            return None
        row = self.db.execute(
            "SELECT value FROM state WHERE session_id = ?", (session_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def ack(self, ack: int | Ack) -> Sent | None:
        """Delete a processed message (and write its Ack); returns the outbox's (session, seq)."""
        if type(ack) is int:
            self.db.execute("DELETE FROM messages WHERE id = ?", (ack,))
            return None
        assert isinstance(ack, Ack)
        return self._apply_ack(ack)

    def ack_box(self, acks: list[int | Ack]) -> tuple[int, Sent | None]:
        """Write a box of acks (see ack_soon); returns (count, the outboxes' (session, seq))."""
        plain = [a for a in acks if type(a) is int]
        if plain:
            self.db.execute(DELETE_IDS, (_json_array(plain),))
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

    def _apply_ack(self, ack: Ack) -> Sent | None:
        """Delete the acked message, and write what its handler changed."""
        db = self.db
        now = ack.at
        if type(ack) is BatchAck:
            self._delete_batch(ack)
        else:
            db.execute("DELETE FROM messages WHERE id = ?", (ack.id,))
        if ack.state is not None:
            db.execute(
                "INSERT OR REPLACE INTO state (session_id, value, updated_at) VALUES (?, ?, ?)",
                (ack.session_id, ack.state, now),
            )
            self._has_state = True
        if ack.key is not None:
            db.execute(
                _KEY_DONE,
                (now, ack.session_id, ack.key, ack.id),
            )
        if not ack.outbox:
            return None
        sent: Sent = []
        for session_id, body, enqueued_at in ack.outbox:
            seq = self._take_seq()
            db.execute(
                "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
                " VALUES (?, ?, ?, 0, 0, ?, ?)",
                (seq, session_id, seq, body, enqueued_at),
            )
            sent.append((session_id, seq))
        return sent

    def _delete_batch(self, ack: BatchAck) -> None:
        """Delete a batch's messages, and mark the keys of its earlier ones processed
        (the last one's is ``ack.key``, marked by the caller)."""
        db = self.db
        earlier = ack.earlier
        db.execute(DELETE_IDS, (_json_array([m.id for m in earlier] + [ack.id]),))
        for m in earlier:
            if m.key is not None:
                db.execute(
                    _KEY_DONE,
                    (ack.at, ack.session_id, m.key, m.id),
                )

    def fail(self, message_id: int, error: str, retry_at: float, max_attempts: int) -> FailOutcome:
        """Record a failed attempt: back to pending until ``retry_at``, or dead."""
        db = self.db
        row = db.execute("SELECT attempts FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            return "gone"
        if row[0] >= max_attempts:
            db.execute(
                "UPDATE messages SET state = 2, not_before = NULL, last_error = ?, alone = 0"
                " WHERE id = ?",
                (error, message_id),
            )
            return "dead"
        db.execute(
            "UPDATE messages SET state = 0, not_before = ?, last_error = ?, alone = 0 WHERE id = ?",
            (retry_at, error, message_id),
        )
        db.execute(NOTE_WAIT, (self.clock_now(),))
        return "retry"

    def release(self, message_id: int, uncount: bool, crashed: bool) -> None:
        """Put an in-flight message back to pending, at the head of its queue."""
        self.db.execute(
            "UPDATE messages SET state = 0, attempts = max(attempts - ?, 0), crashed = ?"
            " WHERE id = ? AND state = 1",
            (1 if uncount else 0, 1 if crashed else 0, message_id),
        )

    def release_many(self, message_ids: list[int]) -> None:
        """Give back claims whose handler never started (claimed on delivery, unused)."""
        self.db.executemany(
            "UPDATE messages SET state = 0, attempts = max(attempts - 1, 0)"
            " WHERE id = ? AND state = 1",
            ((i,) for i in message_ids),
        )

    def nothing(self) -> None:
        """Write nothing: its completion says every operation before it committed."""

    def defer_head(self, session_id: str, until: float) -> bool:
        """Hold the session's head until ``until`` (a suspended session). False if no head."""
        db = self.db
        row = db.execute(HEAD, (session_id,)).fetchone()
        if row is None:
            return False
        db.execute(
            "UPDATE messages SET not_before = max(coalesce(not_before, 0), ?) WHERE id = ?",
            (until, row[0]),
        )
        db.execute(NOTE_WAIT, (self.clock_now(),))
        return True

    # -- the timer and the waiting line -------------------------------------

    def next_due(self, after: float) -> float | None:
        """The earliest delay or retry deadline later than ``after``."""
        db = self.db
        # Delayed messages count whenever they fall due; retry waits only after ``after``.
        delayed = one(
            db,
            "SELECT min(not_before) FROM messages"
            " WHERE not_before IS NOT NULL AND seq IS NULL AND state = 0",
        )
        retry = one(db, "SELECT min(not_before) FROM messages WHERE not_before > ?", (after,))
        values = [v for v in (delayed, retry) if v is not None]
        return min(values) if values else None

    def collect_due(self, after: float, now: float, limit: int) -> DueWork:
        """Deadlines that passed: promote delayed messages into their queues."""
        db = self.db
        due = db.execute(
            "SELECT id, session_id FROM messages WHERE not_before <= ? AND seq IS NULL"
            " AND state = 0 ORDER BY not_before, id LIMIT ?",
            (now, limit + 1),
        ).fetchall()
        promoted: Sent = []
        for msg_id, session_id in due[:limit]:
            assert isinstance(session_id, str)
            seq = self._take_seq()
            db.execute("UPDATE messages SET seq = ?, not_before = NULL WHERE id = ?", (seq, msg_id))
            promoted.append((session_id, seq))
        sessions = [
            row[0]
            for row in db.execute(
                "SELECT DISTINCT session_id FROM messages WHERE not_before > ? AND not_before <= ?"
                " AND seq IS NOT NULL AND state = 0",
                (after, now),
            )
        ]
        return DueWork(promoted=promoted, retry_sessions=sessions, more=len(due) > limit)

    def sessions_with_work(self, limit: int, exclude: frozenset[str]) -> list[tuple[str, int]]:
        """Sessions with queued work and their head's seq, oldest head first, not ``exclude``."""
        rows = self.db.execute(
            "SELECT session_id, min(seq) AS head FROM messages"
            " WHERE state < 2 AND seq IS NOT NULL GROUP BY session_id ORDER BY head LIMIT ?",
            (limit + len(exclude),),
        )
        found = [(s, head) for s, head in rows if s not in exclude]
        return found[:limit]

    def oldest_due(self, now: float) -> float | None:
        """The ``enqueued_at`` of the oldest message that is due or in flight."""
        oldest = one(
            self.db,
            "SELECT min(enqueued_at) FROM messages WHERE state < 2 AND seq IS NOT NULL"
            " AND (not_before IS NULL OR not_before <= ?)",
            (now,),
        )
        return None if oldest is None else float(oldest)

    # -- operators' changes ---------------------------------------------------

    def retry_dead(self, message_id: int | None) -> Sent:
        """Requeue one dead letter, or all, at the back of their sessions' queues."""
        db = self.db
        if message_id is None:
            rows = db.execute("SELECT id, session_id FROM messages WHERE state = 2 ORDER BY id")
        else:
            rows = db.execute(
                "SELECT id, session_id FROM messages WHERE state = 2 AND id = ?", (message_id,)
            )
        requeued: Sent = []
        for msg_id, session_id in rows.fetchall():
            assert isinstance(session_id, str)
            seq = self._take_seq()
            db.execute(
                "UPDATE messages SET state = 0, attempts = 0, seq = ?, not_before = NULL,"
                " last_error = NULL, crashed = 0, alone = 0 WHERE id = ?",
                (seq, msg_id),
            )
            requeued.append((session_id, seq))
        return requeued

    def abort(self, message_id: int, unstarted: bool) -> Aborted | None:
        """Delete a pending or dead message (see ``Store.abort``)."""
        db = self.db
        row = db.execute(
            "SELECT state, session_id, key FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        if row is None:
            return None
        state, session_id, key = MessageState(row[0]), str(row[1]), row[2]
        if unstarted and state is MessageState.IN_FLIGHT:
            state = MessageState.PENDING
        if state is not MessageState.IN_FLIGHT:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if key is not None:  # a later send with that key is new work
                db.execute(
                    "DELETE FROM keys WHERE session_id = ? AND key = ? AND message_id = ?",
                    (session_id, key, message_id),
                )
        return Aborted(state=state, session_id=session_id)

    def purge(
        self, session_id: str | None, dead_only: bool, before: float | None, limit: int
    ) -> Purged:
        """Delete up to ``limit`` messages that are not in flight (see ``Store.purge``)."""
        db = self.db
        where = "state = 2" if dead_only else "state != 1"
        params: tuple[Any, ...] = ()
        if session_id is not None:
            where += " AND session_id = ?"
            params += (session_id,)
        if before is not None:
            where += " AND enqueued_at < ?"
            params += (before,)
        rows = db.execute(
            f"SELECT id, session_id, state, key FROM messages WHERE {where} ORDER BY id LIMIT ?",
            (*params, limit),
        ).fetchall()
        db.executemany("DELETE FROM messages WHERE id = ?", ((row[0],) for row in rows))
        db.executemany(
            "DELETE FROM keys WHERE session_id = ? AND key = ? AND message_id = ?",
            ((s, k, i) for i, s, _, k in rows if k is not None),
        )
        dead = sum(1 for row in rows if row[2] == MessageState.DEAD)
        return Purged(pending=len(rows) - dead, dead=dead, ids=[int(str(row[0])) for row in rows])

    def sweep_keys(self, before: float, limit: int) -> int:
        """Forget idempotency keys whose message was processed before ``before``."""
        self.db.execute(
            "DELETE FROM keys WHERE (session_id, key) IN"
            " (SELECT session_id, key FROM keys WHERE done_at < ? LIMIT ?)",
            (before, limit),
        )
        return int(self.db.changes())

    # -- heartbeat and control table -------------------------------------------

    def heartbeat(self, value: str) -> None:
        """Write the running system's heartbeat (JSON) into ``meta``."""
        self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (HEARTBEAT_KEY, value)
        )

    def take_control(self, limit: int) -> list[ControlRequest]:
        """The open control requests, oldest first, marked taken (see ``Store.take_control``)."""
        db = self.db
        rows = db.execute(
            "SELECT id, command, args FROM control WHERE done_at IS NULL ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        taken: list[ControlRequest] = []
        for request_id, command, args in rows:
            assert isinstance(request_id, int)
            db.execute(
                'UPDATE control SET result = \'{"status": "applying"}\' WHERE id = ?',
                (request_id,),
            )
            taken.append(ControlRequest(id=request_id, command=str(command), args=str(args)))
        return taken

    def finish_control(
        self, request_id: int, done_at: float, result: str, forget_before: float
    ) -> None:
        """Write a control request's outcome; forget requests done before ``forget_before``."""
        db = self.db
        db.execute(
            "UPDATE control SET done_at = ?, result = ? WHERE id = ?", (done_at, result, request_id)
        )
        db.execute("DELETE FROM control WHERE done_at < ?", (forget_before,))
