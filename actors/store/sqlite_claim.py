"""Claiming a session's head, and the fresh messages behind it, in SQLite.

Runs in the committer's transaction (see ``Operations.claim_next``), once
per claim: its queries are prepared once and read the queue's index.

Blame for a dead process: every message in flight whose handler had started
when the process died is marked ``crashed``, its attempt counted (see
sqlite_schema.recover). The poison message among them cannot be told from
its bystanders, so a crashed message whose next attempt is its last runs
*alone* (``alone=True``: the supervisor holds every other handler back). A
message that kills the process every time thus ends in dead letters after
``max_attempts`` deaths, the last one alone, and one that merely shared
crashes with it gets its last attempt in peace. No message is ever
delivered more than ``max_attempts`` times: one whose last attempt ended in
a crash it shared (its earlier attempts had failed normally) is
dead-lettered, with a reason that says the blame is uncertain.
"""

from __future__ import annotations

from typing import Any

import apsw

from .._codec import decode_body
from .._records import Message, new_message
from .blame import gave_up
from .records import Claim

# ``CAST(? AS TEXT)``, not a bare ``?``: SQLite (built with STAT4, as
# apsw's is) lets the value of a bare parameter compared with an indexed
# column choose the plan of a query with ORDER BY, and so prepares such a
# statement again at every run with a new value (the parser and planner,
# most of a claim's time). An expression is not probed: one plan,
# prepared once, the same index (tests/test_handoff.py checks both).
_QUEUE = (
    "SELECT id, seq, attempts, body, enqueued_at, not_before, last_error, crashed, alone, key"
    " FROM messages"
    " WHERE session_id = CAST(? AS TEXT) AND state < 2 AND seq IS NOT NULL ORDER BY seq"
)
HEAD = _QUEUE + " LIMIT 1"
# The head and whether anything follows it.
HEAD2 = _QUEUE + " LIMIT 2"
# The fresh messages behind a claimed head, in order (see claim_following).
FOLLOWING = (
    "SELECT id, seq, state, attempts, body, enqueued_at, crashed, key FROM messages"
    " WHERE session_id = CAST(? AS TEXT) AND state < 2 AND seq > ? ORDER BY seq"
    " LIMIT CAST(? AS INTEGER)"
)
_CLAIM = (
    "UPDATE messages SET state = 1, attempts = ?, not_before = NULL, crashed = 0,"
    " alone = ? WHERE id = ?"
)
_DEAD = "UPDATE messages SET state = 2, not_before = NULL, last_error = ? WHERE id = ?"


def claim_head(
    db: apsw.Connection, session_id: str, now: float, max_attempts: int, alone: bool, bulk: int
) -> Claim:
    """Claim the session's head message, and up to ``bulk`` fresh ones behind it.

    The claim counts the attempt (a delivery) durably before any handler
    runs. A head whose body cannot be decoded, or whose attempts were used
    up by deaths of the process, is dead-lettered here, and the next one is
    tried. A crash suspect on its last attempt is claimed only ``alone``
    (see the module on blame).
    """
    dead: list[int] = []
    while True:
        rows: list[Any] = db.execute(HEAD2, (session_id,)).fetchall()
        if not rows:
            return Claim(None, 0, None, tuple(dead))
        (
            msg_id,
            seq,
            attempts,
            raw,
            enqueued_at,
            not_before,
            last_error,
            crashed,
            ran_alone,
            key,
        ) = rows[0]
        if not_before is not None and not_before > now:
            return Claim(None, seq, not_before, tuple(dead))
        if attempts >= max_attempts:
            db.execute(_DEAD, (gave_up(attempts, crashed, ran_alone, last_error), msg_id))
            dead.append(msg_id)
            continue
        if crashed and attempts == max_attempts - 1 and not alone:
            return Claim(None, seq, None, tuple(dead), alone=True)
        try:
            body = decode_body(raw)
        except ValueError as exc:
            db.execute(_DEAD, (f"cannot decode message body: {exc}", msg_id))
            dead.append(msg_id)
            continue
        db.execute(_CLAIM, (attempts + 1, 1 if alone else 0, msg_id))
        message = Message(
            id=msg_id,
            session_id=session_id,
            body=body,
            attempt=attempts + 1,
            enqueued_at=enqueued_at,
            key=key,
        )
        claim = Claim(message, seq, None, tuple(dead))
        if len(rows) > 1:
            claim.more = True
            if bulk > 0:
                claim_following(db, claim, session_id, seq, bulk)
        return claim


def claim_following(
    db: apsw.Connection, claim: Claim, session_id: str, after: int, limit: int
) -> None:
    """Claim up to ``limit`` fresh messages queued right behind the head just claimed.

    Honest because of the start table: a claimed message whose handler
    never started gets its attempt back after a crash. Only first
    deliveries qualify (never delivered, not crash suspects, decodable);
    the first that does not stops the run, and a later claim takes it as
    its head. Sets ``claim.extra``, ``claim.seq`` (the last one's) and
    ``claim.more`` (whether more wait behind them).
    """
    rows: list[Any] = db.execute(FOLLOWING, (session_id, after, limit + 1)).fetchall()
    extra = claim.extra
    claim.more = len(rows) > limit
    for msg_id, seq, state, attempts, raw, enqueued_at, crashed, key in rows[:limit]:
        if state or attempts or crashed:
            claim.more = True
            break
        try:
            body = decode_body(raw)
        except ValueError:
            claim.more = True
            break
        claim.seq = seq
        extra.append(
            new_message(
                id=msg_id,
                session_id=session_id,
                body=body,
                attempt=1,
                enqueued_at=enqueued_at,
                key=key,
            )
        )
    if extra:
        db.executemany(
            "UPDATE messages SET state = 1, attempts = 1 WHERE id = ?",
            [(m.id,) for m in extra],
        )
