"""The lease table's statements: join, renew, take, give back (blocking; a thread runs them).

A bucket row is ``(bucket, owner, epoch, lease_until)``, with time from the
database's clock (``now()``), never a process's: clocks of hosts disagree,
the server's is the one every process reads.

- **Renew** extends every lease this process holds; the rows it gets back
  are what it still holds, at which epoch. A bucket missing there was
  taken by another process after its lease ran out.
- **Take** picks free or expired buckets (``lease_until < now()``) with
  ``FOR UPDATE SKIP LOCKED``: a bucket whose old owner is committing a
  fenced write holds a key-share lock on the row and is skipped this round, so
  no write of the old owner lands after the epoch grew. Taking bumps the
  epoch, and puts back to pending, marked crashed, what the old owner left
  in flight (its handler may have run: the attempt stays counted).
- **Give back** clears the owner and the lease, keeping the epoch: the old
  owner's last acks were committed before it gave the bucket back.

Buckets spread evenly: each process aims at ``ceil(buckets / live
members)``, takes free buckets up to that at once (a dead member's buckets
move within a round after their leases run out), and gives back what it
holds beyond it a step per round (a new member gets its share gradually).
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

import attrs
import psycopg

from .postgres_ops import SUBSCRIBERS_CHANNEL
from .records import DatabaseCounts

# A member not seen for this long is forgotten (its processed count is
# folded into the database's total first).
FORGET_MEMBERS_AFTER = 600.0


@attrs.frozen
class Round:
    """What one renewal round found."""

    held: dict[int, int]  # {bucket: epoch} still held after renewal
    live: int  # members whose membership is current
    target: int  # this process's fair share of buckets


def join(conn: psycopg.Connection[Any], member: str, ttl: float) -> None:
    """Add this process to the members (its buckets are taken by the first round)."""
    conn.execute(
        "INSERT INTO actors_members (id, host, pid, seen_until)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s))",
        (member, socket.gethostname(), os.getpid(), ttl),
    )


def renew(
    conn: psycopg.Connection[Any], member: str, ttl: float, buckets: int, processed: int
) -> Round:
    """Renew membership and every lease held, write the acks made since this
    process started; count the live members."""
    with conn.transaction():
        conn.execute(
            "UPDATE actors_members SET seen_until = now() + make_interval(secs => %s),"
            " processed = %s WHERE id = %s",
            (ttl, processed, member),
        )
        held = dict(
            conn.execute(
                "UPDATE actors_buckets SET lease_until = now() + make_interval(secs => %s)"
                " WHERE owner = %s RETURNING bucket, epoch",
                (ttl, member),
            ).fetchall()
        )
        row = conn.execute(
            "SELECT count(*) FROM actors_members WHERE seen_until > now()"
        ).fetchone()
    live = max(1, int(row[0]) if row else 1)
    return Round(held=held, live=live, target=math.ceil(buckets / live))


def take(conn: psycopg.Connection[Any], member: str, ttl: float, count: int) -> dict[int, int]:
    """Take up to ``count`` free or expired buckets; returns {bucket: new epoch}."""
    if count <= 0:
        return {}
    with conn.transaction():
        gained = dict(
            conn.execute(
                "UPDATE actors_buckets b SET owner = %s, epoch = b.epoch + 1,"
                " lease_until = now() + make_interval(secs => %s)"
                " FROM (SELECT bucket FROM actors_buckets WHERE lease_until < now()"
                " ORDER BY bucket LIMIT %s FOR UPDATE SKIP LOCKED) AS free"
                " WHERE b.bucket = free.bucket RETURNING b.bucket, b.epoch",
                (member, ttl, count),
            ).fetchall()
        )
        if gained:
            # What the old owner left in flight: its handler may have run.
            conn.execute(
                "UPDATE actors_messages SET state = 0, crashed = true"
                " WHERE bucket = ANY(%s) AND state = 1",
                (list(gained),),
            )
    return gained


def give_back(conn: psycopg.Connection[Any], member: str, buckets: list[int]) -> None:
    """Release ``buckets`` now (their actors have left): another process may take them."""
    if not buckets:
        return
    conn.execute(
        "UPDATE actors_buckets SET owner = NULL, lease_until = '-infinity'"
        " WHERE owner = %s AND bucket = ANY(%s)",
        (member, buckets),
    )


def leave(conn: psycopg.Connection[Any], member: str, processed: int) -> None:
    """A clean stop: give back every bucket, and say this member is gone."""
    with conn.transaction():
        conn.execute(
            "UPDATE actors_buckets SET owner = NULL, lease_until = '-infinity' WHERE owner = %s",
            (member,),
        )
        conn.execute(
            "UPDATE actors_members SET seen_until = now(), processed = %s WHERE id = %s",
            (processed, member),
        )


def forget_members(conn: psycopg.Connection[Any]) -> None:
    """Drop members long gone, keeping their processed count in the total."""
    with conn.transaction():
        # Answers and outputs nobody took (the asker died or gave up) go
        # too, and the subscriptions of members gone.
        for table in ("actors_replies", "actors_outputs"):
            conn.execute(
                f"DELETE FROM {table} WHERE made_at < now() - make_interval(secs => %s)",
                (FORGET_MEMBERS_AFTER,),
            )
        conn.execute(
            "DELETE FROM actors_subscribers s WHERE NOT EXISTS (SELECT 1 FROM actors_members m"
            " WHERE m.id = s.member AND m.seen_until > now() - make_interval(secs => %s))",
            (FORGET_MEMBERS_AFTER,),
        )
        conn.execute(
            "WITH gone AS (DELETE FROM actors_members"
            " WHERE seen_until < now() - make_interval(secs => %s) RETURNING processed)"
            " UPDATE actors_meta SET value = (value::bigint"
            " + (SELECT coalesce(sum(processed), 0) FROM gone))::text WHERE key = 'processed'",
            (FORGET_MEMBERS_AFTER,),
        )


def count_all(conn: psycopg.Connection[Any], member: str) -> DatabaseCounts:
    """Messages by state in the whole database; acks of the other live members
    (as of their last renewal: this one's own count is in its memory)."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 1),"
        " count(*) FILTER (WHERE state = 2),"
        " (SELECT coalesce(sum(processed), 0) FROM actors_members"
        "  WHERE seen_until > now() AND id <> %s) FROM actors_messages",
        (member,),
    ).fetchone()
    assert row is not None
    return DatabaseCounts(
        pending=int(row[0]), in_flight=int(row[1]), dead=int(row[2]), processed=int(row[3])
    )


def take_replies(conn: psycopg.Connection[Any], member: str) -> list[tuple[int, str]]:
    """The answers written for this member's asks (deleted as they are read)."""
    rows = conn.execute(
        "DELETE FROM actors_replies WHERE asker = %s RETURNING message_id, value", (member,)
    ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def take_outputs(conn: psycopg.Connection[Any], member: str) -> list[tuple[str, str]]:
    """The outputs written for this member's subscribers, in order (deleted as read)."""
    rows = conn.execute(
        "DELETE FROM actors_outputs WHERE member = %s RETURNING id, session_id, value", (member,)
    ).fetchall()
    rows.sort()
    return [(str(r[1]), str(r[2])) for r in rows]


def subscribe(
    conn: psycopg.Connection[Any], member: str, added: list[str], gone: list[str]
) -> None:
    """Say which sessions this member's subscribers listen to (and tell the others)."""
    with conn.transaction():
        if added:
            conn.cursor().executemany(
                "INSERT INTO actors_subscribers (session_id, member) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING",
                [(s, member) for s in added],
            )
        if gone:
            conn.execute(
                "DELETE FROM actors_subscribers WHERE member = %s AND session_id = ANY(%s)",
                (member, gone),
            )
        conn.execute("SELECT pg_notify(%s, %s)", (SUBSCRIBERS_CHANNEL, member))


def subscribers(conn: psycopg.Connection[Any], member: str) -> dict[str, list[str]]:
    """{session: the live members other than this one that subscribe to it}."""
    found: dict[str, list[str]] = {}
    for session_id, other in conn.execute(
        "SELECT s.session_id, s.member FROM actors_subscribers s JOIN actors_members m"
        " ON m.id = s.member WHERE m.seen_until > now() AND s.member <> %s",
        (member,),
    ):
        found.setdefault(str(session_id), []).append(str(other))
    return found


def waiting_sessions(
    conn: psycopg.Connection[Any], buckets: list[int], limit: int
) -> tuple[list[tuple[str, float | None]], bool]:
    """Sessions of ``buckets`` with queued work, and until when their head
    waits (None: it does not); whether there are more."""
    rows = conn.execute(
        "SELECT DISTINCT ON (session_id) session_id, not_before FROM actors_messages"
        " WHERE bucket = ANY(%s) AND state = 0 AND seq IS NOT NULL"
        " ORDER BY session_id, seq LIMIT %s",
        (buckets, limit + 1),
    ).fetchall()
    return [(str(r[0]), r[1]) for r in rows[:limit]], len(rows) > limit
