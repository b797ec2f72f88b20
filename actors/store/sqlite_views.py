"""Reads through read-only connections, and the command line's control requests.

A read-only connection of its own, with a busy timeout, in WAL mode: a
reader never blocks the running system's writer and the writer never
blocks a reader, so reads work while a system runs, and neither makes the
other fail with "database is locked".
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import apsw

from .._codec import decode_body
from .._records import DeadLetter
from .errors import UnusableDatabaseError, map_exceptions
from .records import Claimed, InFlight, Membership, MessageCounts, SessionCounts
from .sqlite_schema import HEARTBEAT_KEY, check_schema, one, tables
from .starts import database_identity, read_marks, starts_file

if TYPE_CHECKING:
    from .protocol import ControlRequests, StoreViews


def connect_reader(path: str, busy_ms: int) -> apsw.Connection:
    """A read-only connection to ``path``, waiting up to ``busy_ms`` for a lock."""
    reader = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    reader.set_busy_timeout(busy_ms)
    return reader


def read_dead_letters(
    reader: apsw.Connection, session_id: str | None, limit: int | None
) -> list[DeadLetter]:
    """Dead letters, oldest first; a body that cannot be decoded is shown as stored."""
    sql = (
        "SELECT id, session_id, body, attempts, last_error, enqueued_at FROM messages"
        " WHERE state = 2"
    )
    params: tuple[Any, ...] = ()
    if session_id is not None:
        sql += " AND session_id = ?"
        params = (session_id,)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params += (limit,)
    out = []
    for msg_id, session, raw, attempts, last_error, enqueued_at in reader.execute(sql, params):
        try:
            body = decode_body(raw)
        except ValueError:
            body = raw
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


def has_open_requests(reader: apsw.Connection) -> bool:
    """Whether the control table has a request no system finished (indexed, no transaction)."""
    return bool(one(reader, "SELECT EXISTS (SELECT 1 FROM control WHERE done_at IS NULL)"))


# Attempts a message has used: a handed message's claim counted one that its
# handler has not started (recovery would give it back). The parameter is
# the JSON array of handed ids (Claimed.handed_ids).
_USED = "(attempts - (id IN (SELECT value FROM json_each(?))))"
_SESSIONS = (
    "SELECT session_id, sum(state = 0), sum(state = 1), sum(state = 2),"
    f" min(CASE WHEN state < 2 THEN enqueued_at END), max({_USED})"
    " FROM messages{where} GROUP BY session_id"
    " ORDER BY sum(state < 2) DESC, sum(state = 2) DESC, session_id LIMIT ?"
)


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


def _where(session_id: str | None, conjunction: str = "WHERE") -> tuple[str, tuple[str, ...]]:
    return ("", ()) if session_id is None else (f" {conjunction} session_id = ?", (session_id,))


class SqliteViews:
    """``StoreViews`` on an SQLite file. Open it with :meth:`open`; close it."""

    def __init__(self, path: str, db: apsw.Connection) -> None:
        self._path = path
        self._db = db
        self._what = f"cannot read {path!r}"

    @classmethod
    def open(cls, path: str, busy_timeout: float = 5.0) -> SqliteViews:
        """Open an existing actors database read-only.

        Raises:
          UnusableDatabaseError: no such file, not an SQLite database, or no
            actors schema.
          SchemaVersionError: a schema newer than this version of actors.
        """
        if not os.path.isfile(path):
            raise UnusableDatabaseError(f"no database file at {path!r}")
        with map_exceptions(f"cannot open {path!r}", to=UnusableDatabaseError):
            db = connect_reader(path, int(busy_timeout * 1000))
        try:
            with map_exceptions(f"{path!r} is not an actors database", to=UnusableDatabaseError):
                check_schema(db, path, existing=True)
        except BaseException:
            db.close()
            raise
        return cls(path, db)

    @property
    def path(self) -> str:
        return self._path

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        with map_exceptions(self._what):
            self._db.execute("BEGIN")
        try:
            yield
        finally:
            with map_exceptions(self._what):
                self._db.execute("ROLLBACK")

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with map_exceptions(self._what):
            return one(self._db, sql, params)

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with map_exceptions(self._what):
            return self._db.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        return _int(self._one("PRAGMA user_version"))

    def heartbeat(self) -> str | None:
        value = self._one("SELECT value FROM meta WHERE key = ?", (HEARTBEAT_KEY,))
        return None if value is None else str(value)

    def membership(self) -> Membership | None:
        return None  # (one process owns the file: its lock says whether it runs)

    def counts(self, now: float) -> MessageCounts:
        found: dict[int, tuple[int, int, int]] = {
            _int(state): (_int(n), _int(delayed), _int(waiting))
            for state, n, delayed, waiting in self._rows(
                "SELECT state, count(*), count(CASE WHEN seq IS NULL THEN 1 END),"
                " count(CASE WHEN seq IS NOT NULL AND not_before > ? THEN 1 END)"
                " FROM messages GROUP BY state",
                (now,),
            )
        }
        pending = found.get(0, (0, 0, 0))
        return MessageCounts(
            pending=pending[0],
            delayed=pending[1],
            retry_waiting=pending[2],
            claimed=found.get(1, (0, 0, 0))[0],
            dead=found.get(2, (0, 0, 0))[0],
        )

    def claimed(self) -> Claimed:
        # A session's messages run in order: every claimed message of a
        # session up to its last marked start (in the session's order) has
        # started (it runs, or ran and its ack has not committed yet), and
        # every one after it is handed. The table is read, never written.
        try:
            marks = read_marks(starts_file(self._path), database_identity(self._path))
        except OSError:
            marks = None
        if marks is None:
            return Claimed({}, [])
        started: dict[str, int] = {
            str(session): _int(seq)
            for session, seq in self._rows(
                "SELECT session_id, max(seq) FROM messages WHERE state = 1"
                " AND id IN (SELECT value FROM json_each(?)) GROUP BY session_id",
                (json.dumps(marks),),
            )
        }
        handed: dict[str, int] = {}
        ids: list[int] = []
        for msg_id, session, seq in self._rows(
            "SELECT id, session_id, seq FROM messages WHERE state = 1 ORDER BY id"
        ):
            last = started.get(str(session))
            if last is None or (seq is not None and _int(seq) > last):
                ids.append(_int(msg_id))
                handed[str(session)] = handed.get(str(session), 0) + 1
        return Claimed(handed, ids)

    def session_count(self, session_id: str | None = None) -> int:
        where, params = _where(session_id)
        return _int(self._one(f"SELECT count(DISTINCT session_id) FROM messages{where}", params))

    def sessions(
        self, limit: int, handed_ids: list[int], session_id: str | None = None
    ) -> list[SessionCounts]:
        where, params = _where(session_id)
        return [
            SessionCounts(
                session_id=str(session),
                pending=_int(pending),
                claimed=_int(claimed),
                dead=_int(dead),
                oldest_enqueued_at=None if oldest is None else float(oldest),
                most_attempts=_int(attempts),
            )
            for session, pending, claimed, dead, oldest, attempts in self._rows(
                _SESSIONS.format(where=where), (json.dumps(handed_ids), *params, limit)
            )
        ]

    def attempts_used(self, handed_ids: list[int]) -> dict[int, int]:
        return {
            _int(a): _int(n)
            for a, n in self._rows(
                f"SELECT {_USED} AS used, count(*) FROM messages WHERE state < 2 AND used > 0"
                " GROUP BY used ORDER BY used",
                (json.dumps(handed_ids),),
            )
        }

    def in_flight(self, handed_ids: list[int], limit: int) -> list[InFlight]:
        return [
            InFlight(id=_int(i), session_id=str(s), attempt=_int(a), enqueued_at=float(t))
            for i, s, a, t in self._rows(
                "SELECT id, session_id, attempts, enqueued_at FROM messages WHERE state = 1"
                " AND id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                (json.dumps(handed_ids), limit),
            )
        ]

    def open_requests(self) -> int:
        with map_exceptions(self._what):
            if "control" not in tables(self._db):
                return 0
        return _int(self._one("SELECT count(*) FROM control WHERE done_at IS NULL"))

    def oldest_due(self, now: float) -> float | None:
        oldest = self._one(
            "SELECT min(enqueued_at) FROM messages WHERE state < 2 AND seq IS NOT NULL"
            " AND (not_before IS NULL OR not_before <= ?)",
            (now,),
        )
        return None if oldest is None else float(oldest)

    def dead_letters(
        self, session_id: str | None = None, limit: int | None = None
    ) -> list[DeadLetter]:
        with map_exceptions(self._what):
            return read_dead_letters(self._db, session_id, limit)

    def dead_count(self, session_id: str | None = None) -> int:
        where, params = _where(session_id, "AND")
        return _int(self._one(f"SELECT count(*) FROM messages WHERE state = 2{where}", params))

    def unfinished_ids(self) -> set[int]:
        return {_int(i) for (i,) in self._rows("SELECT id FROM messages WHERE state < 2")}


class SqliteControlRequests:
    """``ControlRequests`` on an SQLite file (read-write, never created)."""

    def __init__(self, path: str, busy_timeout: float = 5.0) -> None:
        """Raises StoreError if the database cannot be opened."""
        self._what = f"cannot write the request into {path!r}"
        with map_exceptions(self._what):
            self._db = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
            self._db.set_busy_timeout(int(busy_timeout * 1000))

    def submit(self, command: str, args: str, at: float) -> int:
        with map_exceptions(self._what):
            self._db.execute(
                "INSERT INTO control (command, args, requested_at) VALUES (?, ?, ?)",
                (command, args, at),
            )
            return int(self._db.last_insert_rowid())

    def answer(self, request_id: int) -> str | None:
        with map_exceptions(self._what):
            rows = self._db.execute(
                "SELECT done_at, result FROM control WHERE id = ?", (request_id,)
            ).fetchall()
        if rows and rows[0][0] is not None:
            return str(rows[0][1])
        return None

    def withdraw(self, request_id: int) -> bool:
        # Only a request no system has taken: one statement decides.
        with map_exceptions(self._what):
            self._db.execute(
                "DELETE FROM control WHERE id = ? AND done_at IS NULL AND result IS NULL",
                (request_id,),
            )
            return bool(self._db.changes() == 1)

    def close(self) -> None:
        self._db.close()


if TYPE_CHECKING:

    def _implements_the_protocols(
        views: SqliteViews, requests: SqliteControlRequests
    ) -> tuple[StoreViews, ControlRequests]:
        return views, requests  # mypy checks that they are what the protocols say
