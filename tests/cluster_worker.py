"""A member of a PostgreSQL cluster in a process of its own, for tests and benchmarks.

    python -m tests.cluster_worker URL --name NAME --lease-ttl 2 [--handler-time 0.005]
        [--buckets N] [--sessions S --rounds R --interval T] [--status-every SECONDS]

Runs ``actors.run_system(URL, ...)`` until SIGTERM or SIGINT, which stop it
cleanly (``System.shutdown(GRACE)``, the recipe of docs/lifecycle.md): its
handlers finish, its buckets are given back at once. SIGKILL and SIGSTOP
are what the tests (tests/test_postgres_processes.py) and the failover
benchmark (benchmarks/pg_failover.py) do to it from outside.

The handler takes a body ``{"n": k}`` and

- logs two rows to ``chaos_log(session, n, worker, pid, started, ended)``
  (made by whoever starts the workers: tests/pgcluster.py), on a psycopg
  autocommit connection of its own: a *start row* when it starts (``ended``
  NULL) and an *end row* when it returns (the same ``started``, and
  ``ended``). Two inserts, no update: an insert needs no index to find its
  row, and a run's rows are paired by ``(pid, session, n, started)``. A run
  without an end row did not return: its process was killed or frozen, or
  it was cancelled. Times are ``time.time()``: every process is on one
  host, so they compare with each other and with the kill times the
  parent records;
- counts in ``ctx.state["count"]`` (+1 per message) and keeps the last
  ``n`` in ``ctx.state["last"]``: the state is committed with the
  message's acknowledgement, fenced by the bucket's epoch, so after any
  number of crashes ``count`` equals the messages sent to the session
  exactly, or a write of a process that had lost the bucket landed;
- sleeps ``--handler-time`` (trio.sleep), so that a kill or a freeze finds
  handlers running.

The inserts block the trio thread for a round trip on localhost: cheaper
than a thread hop per row, and the lease keeper's rounds (every quarter of
``lease_ttl``) do not notice a fraction of a millisecond.

With ``--sessions S`` the member is also the producer: ``--rounds R`` times
(0: until SIGUSR1), every ``--interval`` seconds, one message ``{"n": k}`` to
each of the S sessions ``s0000`` ... (round k, from 1), sent with
``send_many`` in ``PARTS`` parts spread over the interval; a session's
messages are sent in order. It prints ``sent K`` (flushed) once its last
round was committed, and goes on as a member. Its sends go through
``run_system`` as any member's would: the producer is a member of the
cluster like the others (it takes its share of the buckets and runs their
handlers too).

Prints ``ready <pid>`` once the system runs, and ``stopped <pid>`` as it
exits cleanly. ``--status-every SECONDS``: a status line (JSON) on stderr
that often, for finding out why a cluster stalls (:func:`report`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import attrs
import psycopg
import trio

import actors
from actors.store.postgres_cluster import PgCluster

# A round is sent in this many parts, spread over its interval: steady
# traffic, not a burst per round that leaves the handlers idle between.
PARTS = 10
GRACE = 5.0  # handlers' time to finish on SIGTERM (they run for milliseconds)
# High enough that no number of kills in a run dead-letters a message:
# every message must end processed, once.
MAX_ATTEMPTS = 1000


def session_name(i: int) -> str:
    return f"s{i:04d}"


def make_handler(
    url: str, name: str, handler_time: float
) -> Callable[[actors.Context, actors.Message], Awaitable[None]]:
    """The handler described in the module, logging on a connection of its own."""
    conn = psycopg.connect(url, autocommit=True)
    pid = os.getpid()
    insert = "INSERT INTO chaos_log VALUES (%s, %s, %s, %s, %s, %s)"

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        n = msg.body["n"]
        started = time.time()
        conn.execute(insert, (msg.session_id, n, name, pid, started, None))
        ctx.state["count"] = ctx.state.get("count", 0) + 1
        ctx.state["last"] = n
        if handler_time > 0:
            await trio.sleep(handler_time)
        conn.execute(insert, (msg.session_id, n, name, pid, started, time.time()))

    return handle


async def produce(system: actors.System, sessions: int, rounds: int, interval: float) -> None:
    """Send round after round (see the module); ``rounds`` 0: until SIGUSR1.

    SIGUSR1 ends the sending between two rounds, never during one: the
    count printed is exactly what was sent (and committed).
    """
    names = [session_name(i) for i in range(sessions)]
    start = trio.current_time()
    enough = trio.Event()
    k = 0
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_on_signal, signals, enough)
            while not enough.is_set() and (rounds == 0 or k < rounds):
                k += 1
                # A steady rate: part j of round k is due at a fixed time,
                # however long the sends took (a pacing, not a wait for
                # anything), unless told to stop.
                for j in range(PARTS):
                    part = names[j::PARTS]
                    await system.send_many((s, {"n": k}) for s in part)
                    with trio.move_on_at(start + (k - 1 + (j + 1) / PARTS) * interval):
                        await enough.wait()
            nursery.cancel_scope.cancel()
    say("sent", k)


async def _set_on_signal(signals: AsyncIterator[int], event: trio.Event) -> None:
    async for _ in signals:
        event.set()


async def report(system: actors.System, every: float) -> None:
    """A status line (JSON) on stderr every ``every`` seconds: what this member holds and runs.

    For a person finding out why a cluster stalls: it reads the engine's
    insides (the lease keeper's ownership, the supervisor's actors).
    """
    keeper = cast(PgCluster, system._store.cluster)
    own = keeper.own
    while True:
        await trio.sleep(every)
        actors_ = system._sup._actors
        stats = system.statistics()
        status = {
            "t": round(time.time(), 3),
            "own": attrs.asdict(keeper.statistics()),
            "leaving": sorted(own.leaving),
            "rounds": keeper.rounds,
            "failed_rounds": keeper.failed_rounds,
            "actors": len(actors_),
            # Actors of buckets being handed over: each holds its bucket back.
            "actors_leaving": [
                [s, str(a.phase), a.dropped, a.in_flight is not None, len(a.handed)]
                for s, a in actors_.items()
                if own.bucket(s) in own.leaving
            ][:20],
            "pending": stats.pending,
            "in_flight": stats.in_flight,
        }
        print(json.dumps(status), file=sys.stderr, flush=True)


def say(*fields: object) -> None:
    print(*fields, flush=True)


async def stop_on_signals(system: actors.System, signals: AsyncIterator[int]) -> None:
    """SIGTERM or SIGINT: a clean stop; a second one: stop now."""
    async with trio.open_nursery() as nursery:
        async for _ in signals:
            if system.closed:
                await system.shutdown(0)
            else:
                nursery.start_soon(system.shutdown, GRACE)


async def main(args: argparse.Namespace) -> None:
    handler = make_handler(args.url, args.name, args.handler_time)
    options: dict[str, Any] = {
        "lease_ttl": args.lease_ttl,
        "max_attempts": MAX_ATTEMPTS,
        "shutdown_timeout": GRACE,
    }
    if args.buckets is not None:
        options["buckets"] = args.buckets
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outside:
            async with actors.run_system(args.url, handler=handler, **options) as system:
                outside.start_soon(stop_on_signals, system, signals)
                say("ready", os.getpid())
                if args.status_every:
                    outside.start_soon(report, system, args.status_every)
                if args.sessions:
                    await produce(system, args.sessions, args.rounds, args.interval)
                await trio.sleep_forever()
            outside.cancel_scope.cancel()
    say("stopped", os.getpid())


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster_worker")
    parser.add_argument("url")
    parser.add_argument("--name", required=True, help="the worker's name in chaos_log")
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--handler-time", type=float, default=0.005)
    parser.add_argument("--buckets", type=int, default=None)
    parser.add_argument("--sessions", type=int, default=0, help="produce to this many sessions")
    parser.add_argument("--rounds", type=int, default=0, help="rounds to send (0: until stopped)")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between rounds")
    parser.add_argument("--status-every", type=float, default=0.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
