"""What a process that died running handlers leaves beside its database."""

from __future__ import annotations

import os

import apsw

from actors.store.starts import StartTable, database_identity


def mark_started(db_path: str, message_ids: list[int]) -> None:
    """Write the start table as if handlers of these messages had started when it died.

    (Each as the last start of its own actor; messages of one session before
    a marked one count as started too, see Store._recover.)
    """
    path = os.path.abspath(db_path)
    table = StartTable(path + ".starts", database_identity(path))
    try:
        for message_id in message_ids:
            table.mark(table.acquire(), message_id)
    finally:
        table.close()


def mark_in_flight_started(db_path: str) -> list[int]:
    """Mark every message in flight in the database as started; returns their ids."""
    conn = apsw.Connection(db_path)
    try:
        ids = [int(r[0]) for r in conn.execute("SELECT id FROM messages WHERE state = 1")]
    finally:
        conn.close()
    mark_started(db_path, ids)
    return ids
