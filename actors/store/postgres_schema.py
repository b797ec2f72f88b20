"""The PostgreSQL schema, its version check, and connecting.

The tables mirror the SQLite store's (sqlite_schema.py) with what a cluster
adds: every message and state row carries its session's *bucket*
(:func:`bucket_of`), and ``actors_buckets`` leases each bucket to one
process at a time with an epoch that grows at every change of owner
(postgres_leases.py). ``actors_members`` lists the live processes, so that
buckets spread evenly over them; ``actors_replies`` carries the answers of
``ask()`` to a process other than the one that ran the handler.

The queue table is written and deleted at the rate of messages: it keeps
free room in its pages (``fillfactor``) so that a claim's update stays on
its page (a HOT update, no index entry: so no index names ``state``, see
``_SCHEMA_V2``), and autovacuum visits it after a
small fraction of it changed, not the default fifth, so that dead rows do
not slow the queue's index scans.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from .._errors import SchemaVersionError, StoreError
from .buckets import DEFAULT_BUCKETS

# is_url and redact are re-exported: they live where psycopg is not needed.
from .postgres_url import hide_password
from .postgres_url import is_url as is_url
from .postgres_url import redact as redact

log = logging.getLogger("actors.store")

SCHEMA_VERSION = 2
# What ``actors_meta`` says a database is ours by (a database of another
# application with tables named like ours is refused).
APPLICATION = "actors"

_SCHEMA_V1 = (
    "CREATE TABLE actors_meta (key text PRIMARY KEY, value text NOT NULL)",
    """
    CREATE TABLE actors_buckets (
        bucket      integer PRIMARY KEY,
        owner       text,
        epoch       bigint NOT NULL DEFAULT 0,
        lease_until timestamptz NOT NULL DEFAULT '-infinity'
    ) WITH (fillfactor = 50)
    """,
    """
    CREATE TABLE actors_members (
        id          text PRIMARY KEY,
        host        text NOT NULL,
        pid         integer NOT NULL,
        started_at  timestamptz NOT NULL DEFAULT now(),
        seen_until  timestamptz NOT NULL,
        processed   bigint NOT NULL DEFAULT 0,
        heartbeat   text
    )
    """,
    """
    CREATE TABLE actors_messages (
        id          bigint PRIMARY KEY,
        session_id  text NOT NULL,
        bucket      integer NOT NULL,
        seq         bigint,
        state       smallint NOT NULL,
        attempts    integer NOT NULL,
        body        text,
        raw         bytea,
        enqueued_at double precision NOT NULL,
        not_before  double precision,
        last_error  text,
        crashed     boolean NOT NULL DEFAULT false,
        alone       boolean NOT NULL DEFAULT false,
        key         text,
        reply_to    text
    ) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0)
    """,
    # A session's queue, head first (as the SQLite store's messages_queue).
    "CREATE INDEX actors_messages_queue ON actors_messages (session_id, seq)"
    " WHERE state < 2 AND seq IS NOT NULL",
    # A bucket's sessions with work: what a new owner, or a notice, looks for.
    "CREATE INDEX actors_messages_bucket ON actors_messages (bucket, seq)"
    " WHERE state < 2 AND seq IS NOT NULL",
    "CREATE INDEX actors_messages_due ON actors_messages (not_before) WHERE not_before IS NOT NULL",
    "CREATE INDEX actors_messages_dead ON actors_messages (session_id, id) WHERE state = 2",
    """
    CREATE TABLE actors_state (
        session_id text PRIMARY KEY,
        bucket     integer NOT NULL,
        value      text NOT NULL,
        updated_at double precision NOT NULL
    ) WITH (fillfactor = 70)
    """,
    """
    CREATE TABLE actors_keys (
        session_id text NOT NULL,
        key        text NOT NULL,
        message_id bigint NOT NULL,
        done_at    double precision,
        PRIMARY KEY (session_id, key)
    )
    """,
    "CREATE INDEX actors_keys_done ON actors_keys (done_at) WHERE done_at IS NOT NULL",
    """
    CREATE TABLE actors_control (
        id           bigserial PRIMARY KEY,
        command      text NOT NULL,
        args         text NOT NULL,
        requested_at double precision NOT NULL,
        done_at      double precision,
        result       text
    )
    """,
    "CREATE INDEX actors_control_open ON actors_control (id) WHERE done_at IS NULL",
    # subscribe() in one process, of a session run in another: who listens
    # to what, and the outputs on their way to it.
    """
    CREATE TABLE actors_subscribers (
        session_id text NOT NULL,
        member     text NOT NULL,
        PRIMARY KEY (session_id, member)
    )
    """,
    """
    CREATE TABLE actors_outputs (
        id         bigserial PRIMARY KEY,
        member     text NOT NULL,
        session_id text NOT NULL,
        value      text NOT NULL,
        made_at    timestamptz NOT NULL DEFAULT now()
    )
    """,
    "CREATE INDEX actors_outputs_member ON actors_outputs (member, id)",
    """
    CREATE TABLE actors_replies (
        message_id bigint PRIMARY KEY,
        asker      text NOT NULL,
        value      text NOT NULL,
        made_at    timestamptz NOT NULL DEFAULT now()
    )
    """,
)

# Version 2: no index of the queue table names ``state`` (in its columns or
# its predicate), so that a claim's update, which changes only ``state`` and
# the attempt's columns, can be HOT (measured: 63% were, none before; the
# server's time per message fell by a tenth, its WAL by a fifth). A dead
# letter leaves the queue's indexes by losing its seq, and is found by its
# error (``DEAD``).
_SCHEMA_V2 = (
    "DROP INDEX actors_messages_queue",
    "CREATE INDEX actors_messages_queue ON actors_messages (session_id, seq) WHERE seq IS NOT NULL",
    "DROP INDEX actors_messages_bucket",
    "CREATE INDEX actors_messages_bucket ON actors_messages (bucket, seq) WHERE seq IS NOT NULL",
    "DROP INDEX actors_messages_dead",
    "CREATE INDEX actors_messages_dead ON actors_messages (session_id, id)"
    " WHERE last_error IS NOT NULL",
    "UPDATE actors_messages SET seq = NULL WHERE state = 2",
)

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2}

# The dead letters, as queries must say it for actors_messages_dead to serve
# them (every way to the dead letters sets last_error).
DEAD = "state = 2 AND last_error IS NOT NULL"

# Two processes creating the schema of an empty database at once: the
# second waits for the first (a transaction-scoped advisory lock), then
# finds it made.
_SCHEMA_LOCK = 0x6163746F7273  # "actors"


def connect(
    url: str, *, autocommit: bool = False, what: str = "cannot connect"
) -> psycopg.Connection[Any]:
    """A connection to ``url``, its failure a StoreError that names the database."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        # libpq quotes a malformed URL whole in its message, password and
        # all: shown without it, and then not chained (a traceback would
        # print the original).
        said = _first_line(exc)
        text = hide_password(said, url)
        cause = exc if text == said else None
        raise StoreError(f"{what} to PostgreSQL at {redact(url)}: {text}") from cause
    except ValueError as exc:  # a malformed URL (psycopg's conninfo parser)
        text = hide_password(str(exc), url)
        raise ValueError(f"not a usable PostgreSQL URL {redact(url)!r}: {text}") from None
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare_schema(conn: psycopg.Connection[Any], url: str, buckets: int | None) -> int:
    """Create or migrate the schema; returns the database's number of buckets.

    ``buckets`` is fixed when the schema is created; asked for with a
    different number on an existing schema, it is refused.

    Raises:
      SchemaVersionError: the schema is newer than this version of actors.
      StoreError: the database has tables of another application under our
        names, or a different number of buckets.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        version = existing_schema_version(conn, url)
        for target in range(version + 1, SCHEMA_VERSION + 1):
            if version:
                log.info("migrating %s to schema version %d", redact(url), target)
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
        if version == 0:
            count = DEFAULT_BUCKETS if buckets is None else buckets
            conn.execute(
                "INSERT INTO actors_meta (key, value) VALUES ('application', %s),"
                " ('schema_version', %s), ('buckets', %s), ('next_id', '1'), ('processed', '0')",
                (APPLICATION, str(SCHEMA_VERSION), str(count)),
            )
            conn.execute(
                "INSERT INTO actors_buckets (bucket) SELECT generate_series(0, %s - 1)", (count,)
            )
        elif version != SCHEMA_VERSION:
            conn.execute(
                "UPDATE actors_meta SET value = %s WHERE key = 'schema_version'",
                (str(SCHEMA_VERSION),),
            )
        row = conn.execute("SELECT value FROM actors_meta WHERE key = 'buckets'").fetchone()
        assert row is not None
        found = int(row[0])
    if buckets is not None and buckets != found:
        raise ValueError(
            f"buckets={buckets}, but the database {redact(url)} was created with {found} "
            "buckets (fixed when the schema is created)"
        )
    return found


def existing_schema_version(conn: psycopg.Connection[Any], url: str) -> int:
    """The database's actors schema version, 0 if it has none (reads only).

    Raises:
      SchemaVersionError: the schema is newer than this version of actors.
      StoreError: tables named like ours that are not ours.
    """
    version = _schema_version(conn, url)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"database {redact(url)} has actors schema version {version}, newer than "
            f"this version of actors understands ({SCHEMA_VERSION}); upgrade actors"
        )
    return version


def _schema_version(conn: psycopg.Connection[Any], url: str) -> int:
    """0 for a database without our tables; else the version it has.

    Raises:
      StoreError: a table named like ours that is not ours.
    """
    found = {
        row[0]
        for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            " AND tablename LIKE 'actors\\_%%'"
        )
    }
    if not found:
        return 0
    if "actors_meta" not in found:
        raise StoreError(
            f"database {redact(url)} has tables named like actors' ({', '.join(sorted(found))}) "
            "but no actors schema; refusing to change them"
        )
    try:
        rows = dict(
            conn.execute(
                "SELECT key, value FROM actors_meta WHERE key IN ('application', 'schema_version')"
            ).fetchall()
        )
    except psycopg.Error as exc:
        raise StoreError(
            f"database {redact(url)} has a table actors_meta that is not actors': {exc}"
        ) from exc
    if rows.get("application") != APPLICATION or not str(rows.get("schema_version", "")).isdigit():
        raise StoreError(
            f"database {redact(url)} has a table actors_meta of another application; "
            "refusing to change it"
        )
    return int(rows["schema_version"])
