"""Peers from PyPI on the same workload: enqueue, consume, acknowledge.

Each peer gets the same message bodies (the JSON text ``{"n":k}``) through
its public API, in one thread, in chunks: enqueue ``chunk`` messages one
call each, then take and acknowledge each of them, and again, so the backlog
stays at most ``chunk`` (as with actors' 100 concurrent producers). One
thread and no polling is the peers' best case: no lock contention, no
consumer sleeping between polls.

Durability is matched on the peer's SQLite connection: WAL (every peer
turns it on) and ``synchronous`` NORMAL or FULL, set with a PRAGMA where the
peer has no option for it.

After each chunk, the cleanup each library documents for a long-running
queue: without it, the processed rows pile up (and persist-queue's ``get``
scans past all of them, so its cost grows with the run's length).

- persist-queue ``SQLiteAckQueue``: ``put``; ``get(raw=True)`` then
  ``ack(id=...)``, which marks the row acked; ``clear_acked_data()`` (its
  defaults: keep the latest 1,000 acked rows).
- litequeue ``LiteQueue``: ``put``; ``pop`` (claims the row) then ``done``;
  ``prune()`` (deletes the done rows).
- huey ``SqliteHuey``: a registered no-op task; calling it enqueues; the
  consumer's own steps ``dequeue()`` (which deletes the row: huey's ack is
  the dequeue) and ``execute(task)`` run it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

# (enqueue one, consume and ack one, periodic cleanup, how many are left)
_Peer = tuple[Callable[[str], Any], Callable[[], None], Callable[[], Any], Callable[[], int]]


class NotInstalledError(Exception):
    """The peer library is not installed (``pip install -e '.[bench]'``)."""


def _bodies(n: int) -> list[str]:
    return [f'{{"n":{k}}}' for k in range(n)]


def _persistqueue(path: str, sync: str) -> _Peer:
    try:
        import persistqueue
    except ImportError as exc:
        raise NotInstalledError(str(exc)) from exc
    q = persistqueue.SQLiteAckQueue(path, auto_commit=True, multithreading=False)
    q._putter.execute(f"PRAGMA synchronous = {sync}")

    def consume() -> None:
        item = q.get(block=False, raw=True)
        q.ack(id=item["pqid"])

    # Acked rows stay until this (persist-queue issue #77); get() scans past them.
    return q.put, consume, q.clear_acked_data, lambda: q.qsize() + q.unack_count()


def _litequeue(path: str, sync: str) -> _Peer:
    try:
        import litequeue
    except ImportError as exc:
        raise NotInstalledError(str(exc)) from exc
    q = litequeue.LiteQueue(os.path.join(path, "litequeue.db"))
    q.conn.execute(f"PRAGMA synchronous = {sync}")

    def consume() -> None:
        message = q.pop()
        q.done(message.message_id)

    return q.put, consume, q.prune, q.qsize


def _huey(path: str, sync: str) -> _Peer:
    try:
        from huey import SqliteHuey
    except ImportError as exc:
        raise NotInstalledError(str(exc)) from exc
    huey = SqliteHuey(filename=os.path.join(path, "huey.db"), fsync=sync == "FULL")
    huey.storage.conn.execute(f"PRAGMA synchronous = {sync}")

    @huey.task()
    def noop(body: str) -> None:
        pass

    def consume() -> None:
        task = huey.dequeue()
        huey.execute(task)

    return noop, consume, lambda: None, huey.pending_count


_PEERS = {"persistqueue": _persistqueue, "litequeue": _litequeue, "huey": _huey}


def run(params: dict[str, Any], path: str) -> dict[str, Any]:
    n: int = params["messages"]
    chunk: int = params["chunk"]
    sync = "FULL" if params["durability"] == "full" else "NORMAL"
    enqueue, consume, cleanup, left = _PEERS[params["peer"]](path, sync)
    bodies = _bodies(n)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for first in range(0, n, chunk):
        last = min(first + chunk, n)
        for k in range(first, last):
            enqueue(bodies[k])
        for _ in range(first, last):
            consume()
        cleanup()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if left():
        raise AssertionError(f"{left()} messages left in the queue")
    return {
        "messages": n,
        "elapsed_s": elapsed,
        "msg_per_s": n / elapsed,
        "cpu_us_per_msg": cpu / n * 1e6,
    }
