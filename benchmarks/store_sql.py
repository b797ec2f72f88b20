"""The second ceiling: raw apsw replaying the SQL the store ran for an actors run.

Runs the actors scenario of the same parameters (benchmarks/e2e.py) once,
with an apsw exec trace on every connection that records each statement the
store executes and its bindings, in order. Then, on a fresh database in the
same directory, it replays the writer connection's statements with apsw
alone: those before the measured span untimed (the schema, the pragmas, the
recovery), then those of the span timed: the same statements, with the same
parameters, in the same transactions (BEGIN IMMEDIATE ... COMMIT as the
committer grouped them), so the same rows per INSERT, the same claims on
delivery and the same ``json_each`` deletes of ack boxes. Consecutive runs of
one statement are handed to ``executemany`` (as the store does for its
``executemany`` calls), every SELECT's rows are all fetched.

Included: SQLite's parsing (once per statement, apsw's cache), planning,
B-tree work, the WAL writes and, at durability full, the fsync of each
commit; SQLite's automatic checkpoints run inside the commits (the store runs
them in a thread of its own: the same work, counted in the process's CPU
either way). Excluded: everything Python does around the statements in
actors (trio, the send path, routing, the committer's grouping, decoding,
handlers, acks), which is the difference between the two figures; and the
reads of other connections (``statistics()``), outside the span anyway.

The trace slows the recorded run, which can change how the committer groups
messages; ``capture_msgs_per_commit`` is reported beside ``msgs_per_commit``
of the real run, which is a separate scenario.
"""

from __future__ import annotations

import os
import time
from typing import Any

import apsw

from benchmarks import e2e

_READS = ("SELECT", "PRAGMA", "WITH", "VALUES")


class _Recorder:
    """Every statement of every connection opened while installed: (sql, bindings)."""

    def __init__(self) -> None:
        self.logs: list[list[tuple[str, Any]]] = []
        self.marks: dict[str, list[int]] = {}

    def hook(self, db: apsw.Connection) -> None:
        log: list[tuple[str, Any]] = []
        self.logs.append(log)

        def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            log.append((sql, bindings))
            return True

        db.exec_trace = trace

    def mark(self, name: str) -> None:
        self.marks[name] = [len(log) for log in self.logs]


def _plan(statements: list[tuple[str, Any]]) -> list[tuple[str, bool, Any]]:
    """(sql, many, bindings): consecutive writes of one statement joined for executemany."""
    out: list[tuple[str, bool, Any]] = []
    for sql, bindings in statements:
        read = sql.lstrip().upper().startswith(_READS)
        if not read and bindings is not None and out and out[-1][0] == sql and out[-1][1]:
            out[-1][2].append(bindings)
        elif not read and bindings is not None:
            out.append((sql, True, [bindings]))
        else:
            out.append((sql, False, bindings))
    return out


def _replay(db: apsw.Connection, plan: list[tuple[str, bool, Any]]) -> None:
    execute, executemany = db.execute, db.executemany
    for sql, many, bindings in plan:
        if many:
            executemany(sql, bindings)
        else:
            execute(sql, bindings).fetchall()


def run(params: dict[str, Any], path: str) -> dict[str, Any]:
    recorder = _Recorder()
    apsw.connection_hooks.append(recorder.hook)
    try:
        captured = e2e.run_throughput(params, path, recorder.mark)
    finally:
        apsw.connection_hooks.remove(recorder.hook)
    # The writer: the connection that ran the transactions.
    begins = [sum(1 for sql, _ in log if sql.startswith("BEGIN")) for log in recorder.logs]
    writer = begins.index(max(begins))
    log = recorder.logs[writer]
    start, end = recorder.marks["start"][writer], recorder.marks["end"][writer]
    span = log[start:end]
    commits = sum(1 for sql, _ in span if sql.strip().upper() == "COMMIT")
    before, timed = _plan(log[:start]), _plan(span)
    recorder.logs.clear()  # (only the plans are needed now)
    del log, span

    replica = os.path.join(os.path.dirname(path), "replay.db")
    db = apsw.Connection(replica)
    _replay(db, before)
    c0 = time.process_time()
    t0 = time.perf_counter()
    _replay(db, timed)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    left = db.execute("SELECT count(*) FROM messages").fetchall()[0][0]
    db.close()
    messages: int = captured["messages"]
    statements = sum(len(b) if many else 1 for _, many, b in timed)
    return {
        "messages": messages,
        "elapsed_s": elapsed,
        "msg_per_s": messages / elapsed,
        "cpu_us_per_msg": cpu / messages * 1e6,
        "msgs_per_commit": messages / commits if commits else None,
        "statements_per_msg": statements / messages,
        "sqlite_calls_per_msg": len(timed) / messages,
        "rows_left": left,
        "capture_msg_per_s": captured["msg_per_s"],
        "capture_msgs_per_commit": captured["msgs_per_commit"],
    }
