"""The SQLite schema, its version check, and what opening a database does.

Rows live in one table. A message is *pending* (``state`` 0), *in flight*
(1) or *dead* (2), as ``MessageState`` names them; processed messages are
deleted, so nothing piles up. ``seq`` is the message's place in its
session's queue; it is NULL while a delayed message waits for its time, and
a new ``seq`` is drawn when the delay ends or a dead letter is retried, so
the session's order is the order in which messages entered its queue. Ids
and seqs come from one counter (``meta.next_seq``) that is never reused,
even after the newest rows are deleted.

Opening checks the schema version, migrates, and recovers: messages a dead
process left in flight go back to pending (see :func:`recover`).
"""

from __future__ import annotations

import logging
from typing import Any

import apsw
import attrs

from .. import _clock
from .errors import (
    SchemaVersionError,
    StoreError,
    UnusableDatabaseError,
    log_exceptions,
    map_exceptions,
)
from .records import Opened
from .starts import StartTable, database_identity, read_marks, starts_file

log = logging.getLogger("actors.store")

SCHEMA_VERSION = 2

# Room kept in a row, under SQLite's limit on a value (SQLITE_LIMIT_LENGTH,
# which bounds a whole row too), for what sits beside the largest value a
# user makes: a session id and a key (at most 1 KiB each), ids and times,
# and an error text (at most 20,000 characters, 80 KB as UTF-8).
ROW_ROOM = 1 << 17

# Version 1: the queue.
_SCHEMA_V1 = (
    """
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        seq         INTEGER,
        state       INTEGER NOT NULL,
        attempts    INTEGER NOT NULL,
        body        NOT NULL,
        enqueued_at REAL NOT NULL,
        not_before  REAL,
        last_error  TEXT,
        crashed     INTEGER NOT NULL DEFAULT 0,
        alone       INTEGER NOT NULL DEFAULT 0
    )
    """,
    # A session's queue, head first. Dead letters and delayed rows stay out.
    "CREATE INDEX messages_queue ON messages (session_id, seq) WHERE state < 2 AND seq IS NOT NULL",
    # The timer: delayed messages and retries waiting for their time.
    "CREATE INDEX messages_due ON messages (not_before) WHERE not_before IS NOT NULL",
    "CREATE INDEX messages_dead ON messages (session_id, id) WHERE state = 2",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "INSERT INTO meta (key, value) VALUES ('next_seq', 1)",
)

# Version 2: durable actor state, idempotency keys, and the control table
# through which the command line asks a running system to change things.
_SCHEMA_V2 = (
    # ctx.state, committed with the ack of the message that changed it.
    "CREATE TABLE state (session_id TEXT PRIMARY KEY, value TEXT NOT NULL,"
    " updated_at REAL NOT NULL) WITHOUT ROWID",
    # send(key=...): the message a key was first sent as; done_at is set
    # when that message was processed, and the row is dropped a retention
    # window later.
    "ALTER TABLE messages ADD COLUMN key TEXT",
    "CREATE TABLE keys (session_id TEXT NOT NULL, key TEXT NOT NULL, message_id INTEGER NOT NULL,"
    " done_at REAL, PRIMARY KEY (session_id, key)) WITHOUT ROWID",
    "CREATE INDEX keys_done ON keys (done_at) WHERE done_at IS NOT NULL",
    # Requests from `actors retry/abort/purge` while a system runs: the
    # system applies them in order and writes the outcome.
    """
    CREATE TABLE control (
        id           INTEGER PRIMARY KEY,
        command      TEXT NOT NULL,
        args         TEXT NOT NULL,
        requested_at REAL NOT NULL,
        done_at      REAL,
        result       TEXT
    )
    """,
    "CREATE INDEX control_open ON control (id) WHERE done_at IS NULL",
)

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

# The latest epoch time at which a wait (a delay's or a retry's deadline,
# ``not_before``) was written, in ``meta``: see bound_waits.
NOTE_WAIT = (
    "INSERT INTO meta (key, value) VALUES ('waits_written', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)"
)

# The running system's heartbeat (JSON) in ``meta``.
HEARTBEAT_KEY = "heartbeat"


def one(db: apsw.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row (consuming the cursor fully)."""
    rows = db.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


def tables(db: apsw.Connection) -> set[str]:
    """The names of the database's tables."""
    return {
        str(name) for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def check_schema(db: apsw.Connection, path: str, *, existing: bool) -> int:
    """The database's schema version, if this version of actors can use it.

    0 is a new, empty file (to be created). ``existing``: the caller only
    reads, so the file must have the actors schema already.

    Raises:
      SchemaVersionError: a newer schema than this version of actors knows.
      UnusableDatabaseError: ``existing``, and the file has no actors schema.
      StoreError: not ``existing``, and the file has tables of another application.
    """
    version = one(db, "PRAGMA user_version")
    found = tables(db)
    if existing and (not isinstance(version, int) or version < 1 or "messages" not in found):
        raise UnusableDatabaseError(f"{path!r} is not an actors database (it has no actors schema)")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"database {path!r} has schema version {version}, newer than this "
            f"version of actors understands ({SCHEMA_VERSION}); upgrade actors"
        )
    if version == 0 and found:
        raise StoreError(
            f"{path!r} is an SQLite database of another application "
            "(it has tables, but no actors schema); refusing to change it"
        )
    return int(version)


@attrs.frozen
class Prepared:
    """A connection opened, migrated and recovered, and what was read on the way."""

    db: apsw.Connection
    opened: Opened
    identity: tuple[int, int]  # (device, inode) of the file opened
    next_seq: int
    has_state: bool  # whether any session has state
    max_value_bytes: int  # the largest value (a body, a state) a row holds
    starts: StartTable


def open_database(path: str, durability: str, busy_ms: int) -> Prepared:
    """Open (or create) the database at ``path``, migrate it and recover it.

    Blocking (disk work): the store calls it in a worker thread.

    Raises:
      StoreError: the file is not a usable database (SchemaVersionError: a newer one).
    """
    db: apsw.Connection | None = None
    try:
        with map_exceptions(f"cannot open database {path!r}", also=(Exception,)):
            db = apsw.Connection(path)
            return _prepare(db, path, durability, busy_ms)
    except BaseException:
        if db is not None:
            close_quietly(db, path)  # a refused file must not stay open
        raise


def close_quietly(db: apsw.Connection, path: str) -> None:
    """Close; a failure (the checkpoint at close) is logged: it loses nothing,
    since whatever was committed is in the WAL, replayed at the next open."""
    with log_exceptions(log, f"closing database {path!r} failed (nothing is lost)"):
        db.close()


def _prepare(db: apsw.Connection, path: str, durability: str, busy_ms: int) -> Prepared:
    """Check, migrate and recover a freshly opened connection."""
    db.set_busy_timeout(busy_ms)
    max_value_bytes = db.limit(apsw.SQLITE_LIMIT_LENGTH, -1) - ROW_ROOM
    version = check_schema(db, path, existing=False)
    identity = database_identity(path)
    starts_path = starts_file(path)
    marks = read_marks(starts_path, identity)
    mode = one(db, "PRAGMA journal_mode = WAL")
    if mode != "wal":
        raise StoreError(f"cannot use WAL journal mode on {path!r} (got {mode!r})")
    one(db, f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    with db:
        for target in range(version + 1, SCHEMA_VERSION + 1):
            if version:
                log.info("migrating %r to schema version %d", path, target)
            for statement in _MIGRATIONS[target]:
                db.execute(statement)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        recovered = recover(db, marks)
        # The last system's heartbeat speaks for it, not for this one
        # (it may say "stopping"): until this one beats, it has none.
        db.execute("DELETE FROM meta WHERE key = ?", (HEARTBEAT_KEY,))
        bound_waits(db, _clock.wall_time())
    stored = one(db, "SELECT value FROM meta WHERE key = 'next_seq'")
    top = one(db, "SELECT max(coalesce(max(id), 0), coalesce(max(seq), 0)) FROM messages")
    with map_exceptions(f"cannot create {starts_path!r}", also=(OSError,)):
        starts = StartTable(starts_path, identity)
    return Prepared(
        db=db,
        opened=Opened(
            pending=one(db, "SELECT count(*) FROM messages WHERE state < 2"),
            dead=one(db, "SELECT count(*) FROM messages WHERE state = 2"),
            recovered=recovered,
        ),
        identity=identity,
        next_seq=max(int(stored), int(top) + 1),
        has_state=bool(one(db, "SELECT EXISTS (SELECT 1 FROM state)")),
        max_value_bytes=max_value_bytes,
        starts=starts,
    )


def recover(db: apsw.Connection, marks: list[int] | None) -> int:
    """The process died: put whatever was in flight back to pending at once.

    A message whose handler had started keeps its attempt counted (the
    outcome is unknown) and is marked crashed: see ``claim_head`` for how the
    blame is settled. One claimed but still waiting in its actor's queue
    gets its attempt back. The start table (``marks``, see starts.py) says
    which: per session, every claimed message up to the last one whose
    handler started. Without it (no file, or not this database's), every
    claimed message counts as started. Returns how many were in flight.
    """
    if marks is None:
        db.execute("UPDATE messages SET state = 0, crashed = 1 WHERE state = 1")
        started, waiting = db.changes(), 0
    else:
        started = 0
        for message_id in marks:
            row = db.execute(
                "SELECT session_id, seq FROM messages WHERE id = ? AND state = 1",
                (message_id,),
            ).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE messages SET state = 0, crashed = 1"
                    " WHERE session_id = ? AND state = 1 AND seq <= ?",
                    row,
                )
                started += db.changes()
        db.execute("UPDATE messages SET state = 0, attempts = max(attempts - 1, 0) WHERE state = 1")
        waiting = db.changes()
    if started or waiting:
        log.warning(
            "%d message(s) were in flight when the last process died; back to pending"
            " (%d had not started: their attempt is given back)",
            started + waiting,
            waiting,
        )
    return started + waiting


def bound_waits(db: apsw.Connection, now: float) -> int:
    """The wall clock went back since the waits were written: bound each one
    by what it was then. Returns how many deadlines moved.

    Every wait (``not_before``) was written at or before the time kept in
    ``meta`` as ``waits_written``; a wait written at ``w`` for ``d``
    seconds has ``not_before = w + d <= waits_written + d``. If ``now`` is
    earlier than ``waits_written``, the clock went back (at least that
    far): every deadline moves back by the difference, so that each wait
    is at most what was left of it at ``waits_written`` (its ``d`` or
    less), whatever the jump. (As if the clock had stopped while the
    system was down.) A clock that went forward ends waits early; that
    is not caught: nothing can tell it from time that passed.
    """
    written = one(db, "SELECT value FROM meta WHERE key = 'waits_written'")
    if written is None or float(written) <= now:
        return 0
    back = float(written) - now
    db.execute(
        "UPDATE messages SET not_before = not_before - ? WHERE not_before IS NOT NULL",
        (back,),
    )
    moved = db.changes()
    db.execute("UPDATE meta SET value = ? WHERE key = 'waits_written'", (now,))
    log.warning(
        "the clock is %.3f s behind the time the last waits were written; %d delay or"
        " retry deadline(s) moved back as much, so that none waits longer than it was",
        back,
        moved,
    )
    return moved
