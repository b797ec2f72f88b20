"""Read (or poke) a test's database, whichever store holds it.

Tests written against both stores (the ``store`` fixture) look at what was
committed through :func:`query`: the SQL names the SQLite store's tables and
uses ``?``; on PostgreSQL the tables are ``actors_<name>`` and the parameters
``%s``, and the same statement is rewritten to them. Only for reading what a
test asserts on (and a few deliberate corruptions), never for the runtime.
"""

from __future__ import annotations

import re
from typing import Any

import apsw

_TABLES = re.compile(r"\b(FROM|INTO|UPDATE|JOIN)\s+(messages|state|keys|control|meta)\b", re.I)


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def query(target: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on the database and return its rows (committed at once)."""
    if is_postgres(target):
        import psycopg

        text = _TABLES.sub(r"\1 actors_\2", sql).replace("?", "%s")
        with psycopg.connect(target, autocommit=True) as conn:
            cur = conn.execute(text, params)  # type: ignore[arg-type]
            return [tuple(row) for row in cur.fetchall()] if cur.description else []
    conn = apsw.Connection(target)
    try:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()
