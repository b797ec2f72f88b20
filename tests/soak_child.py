"""A child process for tests/test_soak.py: a system that sends and is SIGKILLed.

    python soak_child.py MODE DB LOG --run=N --seed=S [options]

Every line written to LOG is one ``write()`` on a file opened with O_APPEND
and no buffering: a SIGKILL never leaves half a line, and a line is on file
before the code after it runs. Lines (``kind`` is ok, flaky or bad):

    run <run> <pid>                                  at start, before recovery
    ready <run> <recovered>                          the system runs
    acked <id> <session> <index> <kind>              after send()/send_many() returned
    start <id> <session> <index> <kind> <attempt>    a handler starts
    done <id> <session> <index> <kind> <attempt>     it is about to return
    fail <id> <session> <index> <kind> <attempt>     it is about to raise

A message's kind is a function of (session, index) (:func:`kind_of`): "bad"
always raises, "flaky" raises on its first attempt, "ok" never raises.

Modes:
  stream  one sender per session sends ``[session, index, kind]`` bodies
          (index from ``run * INDEX_BASE``), one at a time or in small
          ``send_many`` batches, pausing while more than ``--max-pending``
          messages are pending, forever: the parent kills it.
  drain   no sends: recover, drain, print statistics and dead letters as
          JSON, exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import zlib

import trio
from progress import Log, Room  # the script's own folder

import actors

INDEX_BASE = 1_000_000
MAX_ATTEMPTS = 4


def kind_of(session: str, index: int) -> str:
    """The fixed behaviour of message ``index`` of ``session``: about 2% bad, 5% flaky."""
    h = zlib.crc32(f"{session}:{index}".encode()) % 100
    if h < 2:
        return "bad"
    if h < 7:
        return "flaky"
    return "ok"


class Boom(Exception):
    pass


room = Room()


async def main(args: argparse.Namespace) -> None:
    log = Log(args.log)
    rng = random.Random(args.seed)
    log.write("run", args.run, os.getpid())

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        session, index, kind = msg.body
        fields = (msg.id, session, index, kind, msg.attempt)
        log.write("start", *fields)
        room.poke()  # a claim took one message off the backlog
        await trio.sleep(rng.uniform(0, args.latency))
        if kind == "bad" or (kind == "flaky" and msg.attempt == 1):
            log.write("fail", *fields)
            raise Boom(f"{kind} message {msg.id}, attempt {msg.attempt}")
        log.write("done", *fields)
        # Returned but not yet acknowledged: a kill in this window makes a
        # duplicate, which the parent must find honestly labelled.
        await trio.sleep(rng.uniform(0, args.latency))

    fast = actors.Backoff(initial=0.002, maximum=0.02, jitter=0.5)
    async with actors.run_system(
        args.db,
        handler=handler,
        rng=random.Random(rng.random()),
        max_attempts=MAX_ATTEMPTS,
        retry_backoff=fast,
        restart_policy=actors.RestartPolicy(max_restarts=10**6, backoff=fast),
    ) as system:
        log.write("ready", args.run, system.recovered)
        if args.mode == "stream":
            async with trio.open_nursery() as nursery:
                for i in range(args.sessions):
                    nursery.start_soon(
                        sender, system, log, args, f"s{i}", random.Random(rng.random())
                    )
        else:
            await system.drain()
            stats = system.statistics()
            print(
                json.dumps(
                    {
                        "recovered": system.recovered,
                        "pending": stats.pending,
                        "in_flight": stats.in_flight,
                        "dead": stats.dead,
                        "processed": stats.processed,
                        "dead_letters": [
                            [d.id, d.session_id, d.body, d.attempts, d.last_error.splitlines()[0]]
                            for d in system.dead_letters()
                        ],
                    }
                ),
                flush=True,
            )


async def sender(
    system: actors.System,
    log: Log,
    args: argparse.Namespace,
    session: str,
    rng: random.Random,
) -> None:
    index = args.run * INDEX_BASE
    while True:
        # Keep the backlog bounded, so that hundreds of runs do not pile up
        # more than the final drain can do: there is always some work
        # pending at a kill, never an ever-growing amount.
        await room.wait(system, args.max_pending)
        n = rng.randint(2, 4) if rng.random() < 0.2 else 1
        items = []
        for _ in range(n):
            items.append((session, [session, index, kind_of(session, index)]))
            index += 1
        if n == 1:
            ids = [await system.send(*items[0])]
        else:
            ids = await system.send_many(items)
        for message_id, (_, body) in zip(ids, items, strict=True):
            log.write("acked", message_id, session, body[1], body[2])
        await trio.sleep(rng.uniform(0, args.send_gap))


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stream", "drain"])
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--send-gap", type=float, default=0.004)
    parser.add_argument("--latency", type=float, default=0.002)
    parser.add_argument("--max-pending", type=int, default=300)
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
