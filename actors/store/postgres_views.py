"""The command line's reads and control requests on PostgreSQL (synchronous psycopg).

``PgViews`` reads through a connection of its own that can write nothing
(``default_transaction_read_only``); a snapshot is one ``REPEATABLE READ
READ ONLY`` transaction. Readers never block the cluster's writers nor
wait for them (MVCC), so reads work while the cluster runs.

There is no start table: a member keeps none (a claimed message of a
member that died is put back by whoever takes its bucket over, its attempt
counted), so every claimed message counts as started. Whether a system
runs is what the members' leases say (``membership``).

``PgControl`` writes the control table's requests, which any running
member takes (``FOR UPDATE SKIP LOCKED``: each request by one member).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg

from .._codec import decode_body
from .._records import DeadLetter
from .errors import StoreError, UnusableDatabaseError
from .postgres_schema import DEAD, SCHEMA_VERSION, connect, existing_schema_version
from .postgres_url import hide_password, redact
from .records import Claimed, InFlight, Member, Membership, MessageCounts, SessionCounts

if TYPE_CHECKING:
    from .protocol import ControlRequests, StoreViews

# Attempts a message has used, the claims of the handed ids (%s, an array)
# not counted: as the SQLite views', for the protocol's sake (here no
# message is ever handed).
_USED = "(attempts - (id = ANY(%s::bigint[]))::int)"
_SESSIONS = (
    "SELECT session_id, count(*) FILTER (WHERE state = 0), count(*) FILTER (WHERE state = 1),"
    " count(*) FILTER (WHERE state = 2), min(enqueued_at) FILTER (WHERE state < 2),"
    f" max({_USED}) FROM actors_messages{{where}} GROUP BY session_id"
    " ORDER BY count(*) FILTER (WHERE state < 2) DESC, count(*) FILTER (WHERE state = 2) DESC,"
    " session_id LIMIT %s"
)
_MEMBERS = (
    "SELECT m.id, m.host, m.pid, m.seen_until > now() AS alive,"
    " extract(epoch FROM m.started_at)::float8, m.heartbeat,"
    " (SELECT count(*) FROM actors_buckets b WHERE b.owner = m.id AND b.lease_until > now())"
    " FROM actors_members m ORDER BY alive DESC, m.started_at, m.id"
)


def dead_letter_query(session_id: str | None, limit: int | None) -> tuple[str, list[Any]]:
    """The query of the dead letters, oldest first (rows for :func:`dead_letters_of`)."""
    sql = (
        "SELECT id, session_id, body, raw, attempts, last_error, enqueued_at"
        f" FROM actors_messages WHERE {DEAD}"
    )
    params: list[Any] = []
    if session_id is not None:
        sql += " AND session_id = %s"
        params.append(session_id)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT %s"
        params.append(limit)
    return sql, params


def dead_letters_of(rows: list[Any]) -> list[DeadLetter]:
    """Dead letters from :func:`dead_letter_query`'s rows; a body that cannot be
    decoded is shown as stored."""
    out = []
    for msg_id, session, text, raw, attempts, last_error, enqueued_at in rows:
        stored: str | bytes = text if text is not None else raw
        try:
            body = decode_body(stored)
        except ValueError:
            body = stored
        out.append(
            DeadLetter(
                id=msg_id,
                session_id=session,
                body=body,
                attempts=attempts,
                last_error=last_error or "",
                enqueued_at=enqueued_at,
            )
        )
    return out


def _where(session_id: str | None, conjunction: str = "WHERE") -> tuple[str, tuple[str, ...]]:
    return ("", ()) if session_id is None else (f" {conjunction} session_id = %s", (session_id,))


def _at(heartbeat: str | None) -> float:
    """When a heartbeat was written (its ``at``); -inf if it says no time."""
    try:
        at = json.loads(heartbeat or "null")["at"]
    except (ValueError, TypeError, KeyError):
        return float("-inf")
    return float(at) if isinstance(at, int | float) else float("-inf")


class _Connection:
    """A connection whose failures are StoreErrors that name the database, never its password."""

    def __init__(self, url: str, conn: psycopg.Connection[Any], what: str) -> None:
        self.url = url
        self.shown = redact(url)
        self.conn = conn
        self.what = what

    @contextmanager
    def mapped(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            text = hide_password(str(exc).strip() or type(exc).__name__, self.url)
            raise StoreError(f"{self.what} {self.shown}: {text}") from None

    def one(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        with self.mapped():
            row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def rows(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Any]:
        with self.mapped():
            return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()


def _open(url: str, what: str) -> psycopg.Connection[Any]:
    """An autocommit connection; an unusable URL or server is an UnusableDatabaseError."""
    try:
        return connect(url, autocommit=True, what=what)
    except ValueError as exc:  # a malformed URL (its message shows no password)
        raise UnusableDatabaseError(str(exc)) from None
    except StoreError as exc:
        raise UnusableDatabaseError(str(exc)) from exc.__cause__


class PgViews:
    """``StoreViews`` on a PostgreSQL database. Open it with :meth:`open`; close it."""

    def __init__(self, db: _Connection) -> None:
        self._db = db

    @classmethod
    def open(cls, url: str) -> PgViews:
        """Connect to an existing actors database, read-only.

        Raises:
          UnusableDatabaseError: a malformed URL, no server there, a refused
            login, no such database, or no actors schema in it.
          SchemaVersionError: a schema newer than this version of actors.
        """
        db = _Connection(url, _open(url, "cannot connect"), "cannot read")
        try:
            with db.mapped():
                db.conn.execute("SET default_transaction_read_only = on")
                db.conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                db.conn.read_only = True
            try:
                with db.mapped():
                    version = existing_schema_version(db.conn, url)
            except StoreError as exc:  # (tables of another application)
                raise UnusableDatabaseError(str(exc)) from None
            if version == 0:
                raise UnusableDatabaseError(f"{db.shown} is not an actors database (no tables)")
        except BaseException:
            db.close()
            raise
        return cls(db)

    @property
    def path(self) -> str:
        return self._db.shown

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        with self._db.mapped(), self._db.conn.transaction():
            yield

    def schema_version(self) -> int:
        value = self._db.one("SELECT value FROM actors_meta WHERE key = 'schema_version'")
        return int(value) if value is not None else SCHEMA_VERSION

    def heartbeat(self) -> str | None:
        # One per member: the newest of the live ones, else the newest of
        # all (who ran last). ``membership`` has every member's.
        found = self._membership().members
        live = [m.heartbeat for m in found if m.alive and m.heartbeat is not None]
        every = live or [m.heartbeat for m in found if m.heartbeat is not None]
        return max(every, key=_at) if every else None

    def membership(self) -> Membership | None:
        return self._membership()

    def _membership(self) -> Membership:
        buckets = int(self._db.one("SELECT count(*) FROM actors_buckets"))
        members = [
            Member(
                id=str(member),
                host=str(host),
                pid=int(pid),
                alive=bool(alive),
                started_at=float(started),
                buckets=int(held),
                heartbeat=None if beat is None else str(beat),
            )
            for member, host, pid, alive, started, beat, held in self._db.rows(_MEMBERS)
        ]
        return Membership(buckets=buckets, members=members)

    def counts(self, now: float) -> MessageCounts:
        row = self._db.rows(
            "SELECT count(*) FILTER (WHERE state = 0),"
            " count(*) FILTER (WHERE state = 0 AND seq IS NULL),"
            " count(*) FILTER (WHERE state = 0 AND seq IS NOT NULL AND not_before > %s),"
            " count(*) FILTER (WHERE state = 1), count(*) FILTER (WHERE state = 2)"
            " FROM actors_messages",
            (now,),
        )[0]
        pending, delayed, waiting, claimed, dead = (int(n) for n in row)
        return MessageCounts(
            pending=pending, delayed=delayed, retry_waiting=waiting, claimed=claimed, dead=dead
        )

    def claimed(self) -> Claimed:
        return Claimed({}, [])  # (no start table: every claimed message counts as started)

    def session_count(self, session_id: str | None = None) -> int:
        where, params = _where(session_id)
        return int(
            self._db.one(f"SELECT count(DISTINCT session_id) FROM actors_messages{where}", params)
        )

    def sessions(
        self, limit: int, handed_ids: list[int], session_id: str | None = None
    ) -> list[SessionCounts]:
        where, params = _where(session_id)
        return [
            SessionCounts(
                session_id=str(session),
                pending=int(pending),
                claimed=int(claimed),
                dead=int(dead),
                oldest_enqueued_at=None if oldest is None else float(oldest),
                most_attempts=int(attempts),
            )
            for session, pending, claimed, dead, oldest, attempts in self._db.rows(
                _SESSIONS.format(where=where), (handed_ids, *params, limit)
            )
        ]

    def attempts_used(self, handed_ids: list[int]) -> dict[int, int]:
        return {
            int(a): int(n)
            for a, n in self._db.rows(
                f"SELECT used, count(*) FROM (SELECT {_USED} AS used FROM actors_messages"
                " WHERE state < 2) AS m WHERE used > 0 GROUP BY used ORDER BY used",
                (handed_ids,),
            )
        }

    def in_flight(self, handed_ids: list[int], limit: int) -> list[InFlight]:
        return [
            InFlight(id=int(i), session_id=str(s), attempt=int(a), enqueued_at=float(t))
            for i, s, a, t in self._db.rows(
                "SELECT id, session_id, attempts, enqueued_at FROM actors_messages"
                " WHERE state = 1 AND NOT id = ANY(%s::bigint[]) ORDER BY id LIMIT %s",
                (handed_ids, limit),
            )
        ]

    def open_requests(self) -> int:
        return int(self._db.one("SELECT count(*) FROM actors_control WHERE done_at IS NULL"))

    def oldest_due(self, now: float) -> float | None:
        oldest = self._db.one(
            "SELECT min(enqueued_at) FROM actors_messages WHERE state < 2 AND seq IS NOT NULL"
            " AND (not_before IS NULL OR not_before <= %s)",
            (now,),
        )
        return None if oldest is None else float(oldest)

    def dead_letters(
        self, session_id: str | None = None, limit: int | None = None
    ) -> list[DeadLetter]:
        sql, params = dead_letter_query(session_id, limit)
        return dead_letters_of(self._db.rows(sql, params))

    def dead_count(self, session_id: str | None = None) -> int:
        where, params = _where(session_id, "AND")
        return int(
            self._db.one(f"SELECT count(*) FROM actors_messages WHERE {DEAD}{where}", params)
        )

    def unfinished_ids(self) -> set[int]:
        return {int(i) for (i,) in self._db.rows("SELECT id FROM actors_messages WHERE state < 2")}


class PgControl:
    """``ControlRequests`` on a PostgreSQL database (each call its own transaction)."""

    def __init__(self, url: str) -> None:
        """Raises StoreError if the database cannot be reached."""
        what = "cannot write the request into"
        try:
            conn = connect(url, autocommit=True, what="cannot connect")
        except ValueError as exc:
            raise StoreError(str(exc)) from None
        self._db = _Connection(url, conn, what)

    def submit(self, command: str, args: str, at: float) -> int:
        return int(
            self._db.one(
                "INSERT INTO actors_control (command, args, requested_at) VALUES (%s, %s, %s)"
                " RETURNING id",
                (command, args, at),
            )
        )

    def answer(self, request_id: int) -> str | None:
        rows = self._db.rows(
            "SELECT done_at, result FROM actors_control WHERE id = %s", (request_id,)
        )
        if rows and rows[0][0] is not None:
            return str(rows[0][1])
        return None

    def withdraw(self, request_id: int) -> bool:
        # Only a request no member has taken: a member that is taking it
        # holds its row's lock, and this delete waits for it, then finds it
        # taken.
        with self._db.mapped():
            cur = self._db.conn.execute(
                "DELETE FROM actors_control WHERE id = %s AND done_at IS NULL AND result IS NULL",
                (request_id,),
            )
        return cur.rowcount == 1

    def close(self) -> None:
        self._db.close()


if TYPE_CHECKING:

    def _implements_the_protocols(
        views: PgViews, requests: PgControl
    ) -> tuple[StoreViews, ControlRequests]:
        return views, requests  # mypy checks that they are what the protocols say
