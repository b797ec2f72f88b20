"""Bounded memory at a modest scale: 60,000 pending messages over 15,000 sessions.

The database is filled directly (benchmarks/scale.py's ``fill``, which
writes the rows the store's own schema expects), then a system with
``max_active=100`` and a no-op handler processes all of it. Invariant 7 of
DESIGN.md says pending messages and sessions cost disk, not RAM: at every
handler call the registry holds at most ``max_active`` actors and the
in-memory waiting line at most its documented 10,000 sessions (there are
15,000 sessions with work, so the rest must be found in the database), and
resident memory grows by less than a generous bound while everything is
processed. The handler also checks per-session order. The full-size figures
(a million messages) come from ``python benchmarks/scale.py``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path

import trio

import actors

MESSAGES = 60_000
SESSIONS = 15_000
MAX_ACTIVE = 100
WAITING_LIMIT = 10_000  # docs/guarantees.md, 7: "The waiting line holds at most 10,000 session ids"
RSS_GROWTH_LIMIT = 32 * 2**20  # bytes; the run needs about 4 MiB
PAGE = os.sysconf("SC_PAGE_SIZE")

_spec = importlib.util.spec_from_file_location(
    "scale_benchmark", Path(__file__).parents[1] / "benchmarks" / "scale.py"
)
assert _spec is not None and _spec.loader is not None
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_memory_stays_bounded_while_draining_a_large_backlog(tmp_path: Path) -> None:
    db = str(tmp_path / "scale.db")
    scale.fill(db, MESSAGES, SESSIONS)

    next_index = [0] * SESSIONS  # allocated before the baseline
    calls = 0
    peak_active = peak_waiting = 0
    peak_rss = 0
    violations: list[str] = []
    system: actors.System | None = None

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        nonlocal calls, peak_active, peak_waiting, peak_rss
        calls += 1
        j = int(msg.session_id[1:])
        if msg.body != [next_index[j]]:
            violations.append(f"{msg.session_id}: got {msg.body}, expected [{next_index[j]}]")
        next_index[j] = msg.body[0] + 1
        assert system is not None
        stats = system.statistics()
        peak_active = max(peak_active, stats.active_actors)
        peak_waiting = max(peak_waiting, stats.waiting_sessions)
        if calls % 250 == 0:
            peak_rss = max(peak_rss, rss())

    async def run() -> actors.SystemStatistics:
        nonlocal system
        async with actors.run_system(db, handler=handler, max_active=MAX_ACTIVE) as system:
            assert system.statistics().pending == MESSAGES
            await system.drain()
            return system.statistics()

    gc.collect()
    baseline = rss()
    stats = trio.run(run)

    assert violations == [], violations[:5]
    assert calls == MESSAGES
    assert next_index == [MESSAGES // SESSIONS] * SESSIONS
    assert stats.processed == MESSAGES and stats.pending == 0 and stats.dead == 0
    # The registry and the waiting line stay bounded, and were used.
    assert peak_active == MAX_ACTIVE, peak_active
    assert 0 < peak_waiting <= WAITING_LIMIT, peak_waiting
    growth = peak_rss - baseline
    print(f"\nscale: RSS grew by {growth / 2**20:.1f} MiB, peak waiting {peak_waiting}")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
