"""The limit: raw apsw on the store's own schema, doing the store's work per message.

Per message, the same statements the store runs: the INSERT of ``Store.append``
(batched with ``executemany``), and the three of ``Store.claim_next``: DELETE
of the session's acknowledged message, SELECT of the session's head, UPDATE
that claims it (state 1, attempt counted). Each transaction inserts ``batch``
rows, claims each of them (acking the session's previous one) and writes the
``next_seq`` counter, as the store's group commit does; a last transaction
deletes the claims still open. The sessions take the rows round robin.

No trio, no threads, no JSON decoding: only Python driving SQLite, on one
connection, with WAL and the requested ``synchronous`` (NORMAL or FULL).

Every statement is prepared once (apsw's statement cache keeps them): the
head query compares ``session_id`` with ``CAST(? AS TEXT)`` as the store's
does (sqlite_claim.py), since with a bare ``?`` this SQLite (built with
STAT4) prepares it again at every run, which once made this baseline
2.3-2.6x slower than SQLite allows for it.

This is a per-row baseline: three statements per message, where the store
inserts up to 256 rows per statement, inserts most messages already claimed
and deletes a box of acks in one statement. What SQLite allows for the SQL
the store actually runs is the other ceiling, benchmarks/store_sql.py.
"""

from __future__ import annotations

import time
from typing import Any

import apsw

from actors.store.sqlite_schema import _SCHEMA_V1, _SCHEMA_V2

_INSERT = (
    "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at)"
    " VALUES (?, ?, ?, 0, 0, ?, ?)"
)
_ACK = "DELETE FROM messages WHERE id = ?"
_HEAD = (
    "SELECT id, seq, attempts, body, enqueued_at, not_before, last_error, crashed, alone"
    " FROM messages"
    " WHERE session_id = CAST(? AS TEXT) AND state < 2 AND seq IS NOT NULL ORDER BY seq LIMIT 1"
)
_CLAIM = (
    "UPDATE messages SET state = 1, attempts = ?, not_before = NULL, crashed = 0,"
    " alone = ? WHERE id = ?"
)
_COUNTER = "UPDATE meta SET value = ? WHERE key = 'next_seq'"


def run(params: dict[str, Any], path: str) -> dict[str, Any]:
    rows: int = params["rows"]
    batch: int = params["batch"]
    sessions = [f"s{i}" for i in range(params["sessions"])]
    n_sessions = len(sessions)
    sync = "FULL" if params["durability"] == "full" else "NORMAL"

    db = apsw.Connection(path)
    mode = db.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
    assert mode == "wal", mode
    db.execute(f"PRAGMA synchronous = {sync}")
    with db:
        for statement in _SCHEMA_V1 + _SCHEMA_V2:
            db.execute(statement)
    execute = db.execute
    in_flight: dict[str, int] = {}
    commits = 0

    c0 = time.process_time()
    t0 = time.perf_counter()
    for first in range(1, rows + 1, batch):
        last = min(first + batch, rows + 1)
        now = time.time()
        execute("BEGIN IMMEDIATE")
        db.executemany(
            _INSERT,
            ((i, sessions[i % n_sessions], i, f'{{"n":{i}}}', now) for i in range(first, last)),
        )
        for i in range(first, last):
            session = sessions[i % n_sessions]
            acked = in_flight.pop(session, None)
            if acked is not None:
                execute(_ACK, (acked,))
            head = execute(_HEAD, (session,)).fetchone()
            assert head is not None
            execute(_CLAIM, (head[2] + 1, 0, head[0]))
            in_flight[session] = head[0]
        execute(_COUNTER, (last,))
        execute("COMMIT")
        commits += 1
    execute("BEGIN IMMEDIATE")
    for acked in in_flight.values():
        execute(_ACK, (acked,))
    execute("COMMIT")
    commits += 1
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0

    left = db.execute("SELECT count(*) FROM messages").fetchall()[0][0]
    db.close()
    if left:
        raise AssertionError(f"{left} rows left after the raw run")
    return {
        "messages": rows,
        "elapsed_s": elapsed,
        "msg_per_s": rows / elapsed,
        "cpu_us_per_msg": cpu / rows * 1e6,
        "msgs_per_commit": rows / commits,
    }
