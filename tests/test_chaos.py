"""Chaos: a monkey kills random actors mid-message while many sessions send.

Everything runs on trio's MockClock (``autojump_clock``): handler latency,
the monkey's pauses, retry backoffs and restart delays cost no real time, so
thousands of kills fit in a few seconds. Randomness comes from one seeded
``random.Random``; trio's scheduler still adds some nondeterminism, so a
seed fixes the workload, not the exact interleaving.

What each run checks, against the invariants of DESIGN.md:
  1. nothing acknowledged is lost: every id ``send()`` returned completes,
     nothing is dead-lettered, and ``drain()`` leaves nothing pending;
  2. per-session order: a message starts only after every earlier message
     of its session completed, and first completions follow send order;
  3. one handler at a time per session, across kills and restarts;
  4. at-least-once, honestly: the n-th start of a message says
     ``attempt == n``, so every redelivery says ``attempt > 1``; extra
     starts only come from kills, and a message completes twice only if it
     was in flight in a killed actor;
  and the accounting: every cancelled handler is one failed attempt, and
  every successful kill is one restart.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest
import trio

import actors

# Kills count as failed attempts: never let them use up a message.
MAX_ATTEMPTS = 10**6
RETRY_BACKOFF = actors.Backoff(initial=0.001, maximum=0.01)
# Restart at once and never suspend a session, however often it is killed.
RESTART_POLICY = actors.RestartPolicy(
    max_restarts=10**6, window=1.0, backoff=actors.Backoff(initial=0.0, maximum=0.0, jitter=0)
)

HANDLER_LATENCY = 0.01  # a handler sleeps uniform(0, this) seconds (mock clock)
SEND_GAP = 0.016  # a sender pauses uniform(0, this) seconds between sends
MONKEY_GAP = 0.0002  # the monkey pauses uniform(0, this) seconds between kills


class Chaos:
    """One chaos run: the workload, and everything the handler and monkey saw."""

    def __init__(
        self,
        *,
        seed: int,
        sessions: int,
        per_session: int,
        target_kills: int,
        **options: object,
    ) -> None:
        self.options = options  # more run_system options
        self.rng = random.Random(seed)
        self.sessions = [f"session-{i:03d}" for i in range(sessions)]
        self.per_session = per_session
        self.target_kills = target_kills
        # What send() acknowledged: {message id: (session, index)}.
        self.sent: dict[int, tuple[str, int]] = {}
        # Attempt numbers seen at each handler start: {message id: [attempt, ...]}.
        self.starts: defaultdict[int, list[int]] = defaultdict(list)
        self.completions: Counter[int] = Counter()
        # Indices of each session in the order of their FIRST completion.
        self.first_completions: dict[str, list[int]] = {s: [] for s in self.sessions}
        self.completed: dict[str, set[int]] = {s: set() for s in self.sessions}
        # {session: id of the message whose handler runs now, or None}
        self.running: dict[str, int | None] = dict.fromkeys(self.sessions)
        # {session: id of the message its handler started last}
        self.last_started: dict[str, int] = {}
        self.cancelled = 0  # handler runs cut short by a kill
        self.kills = 0  # system.kill() calls that returned True
        self.kills_mid_handler = 0  # ... while a handler of the session was running
        self.kill_calls = 0
        self.kills_while_sending = 0  # ... while senders were still sending
        # Messages that may have been in flight in a killed actor: the one
        # running, or started last, in the session when it was killed.
        self.in_flight_at_kill: set[int] = set()
        self.violations: list[str] = []  # seen inside the handler (raising there would retry)
        self.senders_done = False
        self.stats: actors.SystemStatistics | None = None
        self.dead: list[actors.DeadLetter] = []

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> None:
        session, index = msg.body
        if session != ctx.session_id or self.sent.get(msg.id, (session, index)) != (
            session,
            index,
        ):
            self.violations.append(f"message {msg.id} has body {msg.body!r} in {ctx.session_id}")
        if self.running[session] is not None:
            self.violations.append(
                f"{session}: message {msg.id} started while {self.running[session]} runs"
            )
        missing = [i for i in range(index) if i not in self.completed[session]]
        if missing:
            self.violations.append(
                f"{session}: index {index} started before indices {missing[:5]} completed"
            )
        self.running[session] = msg.id
        self.last_started[session] = msg.id
        self.starts[msg.id].append(msg.attempt)
        try:
            await trio.sleep(self.rng.uniform(0, HANDLER_LATENCY))
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.running[session] = None
        # No checkpoint from here on: the handler has returned once this is recorded.
        self.completions[msg.id] += 1
        if index not in self.completed[session]:
            self.completed[session].add(index)
            self.first_completions[session].append(index)

    async def sender(self, system: actors.System, session: str) -> None:
        for index in range(self.per_session):
            message_id = await system.send(session, [session, index])
            assert message_id not in self.sent
            self.sent[message_id] = (session, index)
            await trio.sleep(self.rng.uniform(0, SEND_GAP))

    async def senders(self, system: actors.System) -> None:
        async with trio.open_nursery() as nursery:
            for session in self.sessions:
                nursery.start_soon(self.sender, system, session)
        self.senders_done = True

    async def monkey(self, system: actors.System) -> None:
        # Bounded: a runtime that stopped running actors must fail, not hang.
        for _ in range(self.target_kills * 50):
            if self.kills >= self.target_kills:
                return
            await trio.sleep(self.rng.uniform(0, MONKEY_GAP))
            busy = [s for s, m in self.running.items() if m is not None]
            if busy and self.rng.random() < 0.9:
                session = self.rng.choice(busy)
            else:
                session = self.rng.choice(self.sessions)
            mid_handler = self.running[session] is not None
            self.kill_calls += 1
            if system.kill(session):
                self.kills += 1
                self.kills_mid_handler += mid_handler
                self.kills_while_sending += not self.senders_done
                if session in self.last_started:
                    self.in_flight_at_kill.add(self.last_started[session])

    async def run(self, db_path: str) -> None:
        async with actors.run_system(
            db_path,
            handler=self.handler,
            rng=random.Random(self.rng.random()),
            max_attempts=MAX_ATTEMPTS,
            retry_backoff=RETRY_BACKOFF,
            restart_policy=RESTART_POLICY,
            **self.options,
        ) as system:
            # Virtual seconds: with autojump a hang fails fast instead of hanging.
            with trio.fail_after(3600):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.senders, system)
                    nursery.start_soon(self.monkey, system)
                await system.drain()
            self.stats = system.statistics()
            self.dead = system.dead_letters()

    def check(self) -> None:
        stats = self.stats
        assert stats is not None
        assert self.senders_done
        assert self.kills >= self.target_kills, (self.kills, self.kill_calls)
        # The kills landed mid-message (the monkey prefers busy sessions).
        assert self.kills_mid_handler >= self.target_kills // 2, self.kills_mid_handler
        # ... and while the senders were still at work.
        assert self.kills_while_sending >= self.target_kills // 2, self.kills_while_sending
        assert self.cancelled > 0
        assert not self.violations, self.violations[:10]

        # 1. Nothing acknowledged is lost.
        expected = len(self.sessions) * self.per_session
        assert len(self.sent) == expected
        never = sorted(set(self.sent) - set(self.completions))
        assert not never, f"{len(never)} acknowledged messages never completed: {never[:10]}"
        assert set(self.completions) == set(self.sent)  # and nothing unknown ran
        assert self.dead == []
        assert stats.dead == 0 and stats.dead_lettered == 0
        assert stats.pending == 0 and stats.in_flight == 0
        assert stats.sends == expected

        # 2. Per-session order of first completion is send order.
        for session in self.sessions:
            assert self.first_completions[session] == list(range(self.per_session)), session

        # 4. At-least-once, honestly: the n-th start of a message is attempt n.
        for message_id, attempts in self.starts.items():
            assert attempts == list(range(1, len(attempts) + 1)), (message_id, attempts)
        redelivered = [a for attempts in self.starts.values() for a in attempts[1:]]
        assert redelivered and all(a > 1 for a in redelivered)
        total_starts = sum(len(a) for a in self.starts.values())
        extra_starts = total_starts - expected
        assert extra_starts > 0
        assert extra_starts <= self.kills, (extra_starts, self.kills)
        # Every start either completed or was cut short by a kill.
        assert total_starts == sum(self.completions.values()) + self.cancelled
        duplicates = {m for m, n in self.completions.items() if n > 1}
        assert duplicates <= self.in_flight_at_kill, sorted(duplicates - self.in_flight_at_kill)

        # Accounting: a cancelled handler is a failed attempt; a kill a restart.
        assert stats.failed_attempts == self.cancelled, (stats.failed_attempts, self.cancelled)
        assert stats.restarts >= self.kills, (stats.restarts, self.kills)


async def test_monkey_kills_thousands_of_actors_mid_message(
    db_path: str, autojump_clock: object
) -> None:
    chaos = Chaos(seed=20240601, sessions=120, per_session=30, target_kills=2000)
    await chaos.run(db_path)
    chaos.check()


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
async def test_monkey_kills_actors_small(db_path: str, autojump_clock: object, seed: int) -> None:
    chaos = Chaos(seed=seed, sessions=16, per_session=12, target_kills=150)
    await chaos.run(db_path)
    chaos.check()


async def test_monkey_kills_while_actors_passivate_and_rotate(
    db_path: str, autojump_clock: object
) -> None:
    # Few slots, a small fair share and a short idle timeout: kills land
    # while actors yield their slot, passivate and start again.
    chaos = Chaos(
        seed=99,
        sessions=40,
        per_session=15,
        target_kills=300,
        max_active=8,
        fair_share=2,
        idle_timeout=0.003,
    )
    await chaos.run(db_path)
    chaos.check()
