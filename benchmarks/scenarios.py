"""The scenarios: names (the keys of the JSON), what each measures, its sizes.

Sizes are the full ones times ``scale`` (``--quick`` uses 0.05), with floors
so that a tiny scale still exercises every code path. The latency scenarios
get their offered rate at run time: half the median msg/s measured so far by
``send_s100_normal``, which therefore always runs before them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

DURABILITIES = ("normal", "full")
PEERS = ("persistqueue", "litequeue", "huey")
# The scenario whose measured maximum sets the latency scenario's offered rate.
LATENCY_BASE = "send_s100_normal"
# The actors scenarios that get a second ceiling: ``raw_sql_<name>``, raw apsw
# replaying the SQL the store ran for the same messages (benchmarks/store_sql.py).
REPLAYED = ("send_s100_normal", "send_s10k_normal", "many_s100_normal", "send_s100_full")
REPLAY_PREFIX = "raw_sql_"
# The largest batch of the batched handler's scenario (many_batch_s100_normal).
BATCH_SIZE = 100


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # which function of benchmarks._worker runs it
    label: str  # one line for the table
    params: dict[str, Any] = field(default_factory=dict)


def _scaled(full: int, scale: float, floor: int) -> int:
    return max(floor, round(full * scale))


def build(scale: float = 1.0, quick: bool = False) -> list[Scenario]:
    """Every scenario, in the order a round runs them."""
    out: list[Scenario] = []
    for durability in DURABILITIES:
        for batch in (100, 1000):
            rows = _scaled(100_000, scale, 2 * batch)
            out.append(
                Scenario(
                    f"raw_b{batch}_{durability}",
                    "raw",
                    f"raw apsw, {batch} rows/txn, {durability}",
                    {"rows": rows, "batch": batch, "sessions": 100, "durability": durability},
                )
            )
    for durability in DURABILITIES:
        out.append(
            Scenario(
                f"send_s100_{durability}",
                "actors",
                f"actors send(), 100 sessions x {_scaled(1000, scale, 1)}, {durability}",
                {
                    "mode": "send",
                    "sessions": 100,
                    "per_session": _scaled(1000, scale, 1),
                    "producers": 100,
                    "durability": durability,
                },
            )
        )
        sessions = _scaled(10_000, scale, 100)
        out.append(
            Scenario(
                f"send_s10k_{durability}",
                "actors",
                f"actors send(), {sessions} sessions x 10, {durability}",
                {
                    "mode": "send",
                    "sessions": sessions,
                    "per_session": 10,
                    "producers": 100,
                    "durability": durability,
                },
            )
        )
        if durability == "normal":
            # Every message a session of its own: one activation per message.
            sessions = _scaled(100_000, scale, 1000)
            out.append(
                Scenario(
                    f"send_s100k_{durability}",
                    "actors",
                    f"actors send(), {sessions} sessions x 1, {durability}",
                    {
                        "mode": "send",
                        "sessions": sessions,
                        "per_session": 1,
                        "producers": 100,
                        "durability": durability,
                    },
                )
            )
        # One session, 100 producers: their sends share commits, and the session's
        # actor is handed them at insert. (100,000 at FULL would take long per round.)
        per = _scaled(100_000 if durability == "normal" else 20_000, scale, 100)
        out.append(
            Scenario(
                f"send_s1_{durability}",
                "actors",
                f"actors send(), 1 session x {per}, {durability}",
                {
                    "mode": "send",
                    "sessions": 1,
                    "per_session": per,
                    "producers": 100,
                    "durability": durability,
                },
            )
        )
        messages = _scaled(100_000, scale, 1000)
        many = {
            "mode": "send_many",
            "sessions": 100,
            "per_session": messages // 100,
            "batch": 1000,
            "producers": 10,
            "durability": durability,
        }
        out.append(
            Scenario(
                f"many_s100_{durability}",
                "actors",
                f"actors send_many(1000/call), 100 sessions, {messages} msgs, {durability}",
                many,
            )
        )
        if durability == "normal":
            # The same sends to a no-op batched handler (actors.batched,
            # max_size=100), in the same rounds: its ratio to many_s100_normal
            # is what batching buys.
            out.append(
                Scenario(
                    f"many_batch_s100_{durability}",
                    "actors",
                    f"the same, to a no-op batched handler (max_size={BATCH_SIZE})",
                    {**many, "batched": BATCH_SIZE},
                )
            )
    out += _replays(out)
    per = _scaled(500, scale, 1)
    for idle in (0, _scaled(100_000, scale, 100)):
        out.append(
            Scenario(
                f"idle_{'0' if idle == 0 else '100k'}",
                "actors",
                f"actors send(), 100 sessions x {per}, {idle} idle sessions, normal",
                {
                    "mode": "send",
                    "sessions": 100,
                    "per_session": per,
                    "producers": 100,
                    "durability": "normal",
                    "idle_sessions": idle,
                    "idle_timeout": 0.5,
                },
            )
        )
    duration = 1.0 if quick else 4.0
    out.append(
        Scenario(
            "latency_half",
            "latency",
            "actors send() at half of send_s100_normal's msg/s, normal",
            {"sessions": 100, "duration": duration, "durability": "normal"},
        )
    )
    # The same, with gc.freeze() once the system is up (docs/howto-tuning.md):
    # the objects alive then are left out of Python's later full collections.
    out.append(
        Scenario(
            "latency_gcfreeze",
            "latency",
            "the same, with gc.freeze() after start",
            {"sessions": 100, "duration": duration, "durability": "normal", "gc_freeze": True},
        )
    )
    for durability in DURABILITIES:
        # The peers commit (and at FULL fsync) 2-3 times per message: smaller runs.
        messages = _scaled(10_000 if durability == "normal" else 1_000, scale, 100)
        for peer in PEERS:
            out.append(
                Scenario(
                    f"peer_{peer}_{durability}",
                    "peer",
                    f"{peer}: enqueue, consume, ack {messages} msgs, {durability}",
                    {
                        "peer": peer,
                        "messages": messages,
                        "chunk": 100,
                        "durability": durability,
                    },
                )
            )
    return out


def _replays(scenarios: list[Scenario]) -> list[Scenario]:
    """The store-SQL ceiling of each scenario in REPLAYED: the same parameters."""
    return [
        Scenario(
            REPLAY_PREFIX + s.name,
            "store_sql",
            f"raw apsw replaying the store's SQL of {s.name}",
            dict(s.params),
        )
        for s in scenarios
        if s.name in REPLAYED
    ]


def select(scenarios: list[Scenario], only: list[str] | None) -> list[Scenario]:
    """The scenarios matching any of ``only`` (a name, a prefix or a glob).

    A latency scenario pulls in the one that sets its rate.
    """
    if not only:
        return scenarios

    def wanted(name: str) -> bool:
        return any(name.startswith(p) or fnmatch.fnmatchcase(name, p) for p in only)

    names = {s.name for s in scenarios if wanted(s.name)}
    if any(s.kind == "latency" and s.name in names for s in scenarios):
        names.add(LATENCY_BASE)
    return [s for s in scenarios if s.name in names]
