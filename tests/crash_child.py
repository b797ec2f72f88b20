"""A child process for tests/test_process_crash.py: a system that gets killed.

    python crash_child.py MODE DB LOG [options]

Every line the child writes to LOG is one ``write()`` on a file opened with
O_APPEND and no buffering, so a SIGKILL never leaves half a line and a line
is in the file before the code after it runs. Lines:

    run <run> <pid> <mode>                          at start, before recovery
    acked <id> <session> <index>                    after send() returned
    processed <id> <session> <index> <attempt>      in the handler, before it returns
    poison <id> <session> <index> <attempt>         just before os._exit(1)
    ready <pid>                                     (hold) the system is running

Modes:
  stream  one sender task per session sends ``[session, index]`` bodies
          continuously (index from ``run * INDEX_BASE``), then waits to be
          killed: this mode never exits by itself.
  drain   no sends: recover, drain, print the statistics as JSON, exit 0.
  poison  with --seed, first send the poison workload in one transaction;
          then drain. The poison message's handler calls os._exit(1).
  hold    start the system, say ready, and block until killed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable

import trio
from progress import Log  # the script's own folder

import actors

INDEX_BASE = 1_000_000


def make_handler(
    log: Log, before: float, after: float, logged: trio.Event
) -> Callable[[actors.Context, actors.Message], Awaitable[None]]:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        # A handler may run before send_many() returns to its caller (its
        # messages were handed to new actors at insert): the poison would
        # end the process before the seed is logged.
        await logged.wait()
        session, index = msg.body[0], msg.body[1]
        if before:
            await trio.sleep(before)
        if len(msg.body) > 2 and msg.body[2] == "poison":
            log.write("poison", msg.id, session, index, msg.attempt)
            os._exit(1)  # a message that kills the whole process
        log.write("processed", msg.id, session, index, msg.attempt)
        # Still in flight (not acked) while this sleeps: a kill now makes a
        # duplicate, which the parent must find honestly labelled.
        if after:
            await trio.sleep(after)

    return handler


async def stream(system: actors.System, log: Log, args: argparse.Namespace) -> None:
    async def sender(session: str) -> None:
        for k in range(args.per_session):
            index = args.run * INDEX_BASE + k
            message_id = await system.send(session, [session, index])
            log.write("acked", message_id, session, index)
            if args.send_gap:
                await trio.sleep(args.send_gap)

    async with trio.open_nursery() as nursery:
        for i in range(args.sessions):
            nursery.start_soon(sender, f"s{i}")
    await trio.sleep_forever()  # the parent kills us


async def seed_poison(system: actors.System, log: Log) -> None:
    items: list[tuple[str, list[object]]] = [
        ("p", ["p", 0]),
        ("p", ["p", 1, "poison"]),
        ("p", ["p", 2]),
        ("p", ["p", 3]),
    ]
    for session in ("o1", "o2"):
        items += [(session, [session, i]) for i in range(5)]
    ids = await system.send_many(items)
    for message_id, (session, body) in zip(ids, items, strict=True):
        log.write("acked", message_id, session, body[1])


def statistics(system: actors.System) -> dict[str, object]:
    stats = system.statistics()
    return {
        "recovered": system.recovered,
        "pending": stats.pending,
        "in_flight": stats.in_flight,
        "dead": stats.dead,
        "processed": stats.processed,
    }


async def main(args: argparse.Namespace) -> None:
    log = Log(args.log)
    logged = trio.Event()  # what the seed sent is in the log
    handler = make_handler(log, args.before, args.after, logged)
    # Before recovery: no handler of this run can log before this line.
    log.write("run", args.run, os.getpid(), args.mode)
    async with actors.run_system(
        args.db,
        handler=handler,
        max_attempts=args.max_attempts,
        retry_backoff=actors.Backoff(initial=0.01, maximum=0.05),
        restart_policy=actors.RestartPolicy(backoff=actors.Backoff(initial=0.01, maximum=0.05)),
    ) as system:
        if not (args.mode == "poison" and args.seed):
            logged.set()
        if args.mode == "stream":
            await stream(system, log, args)
        elif args.mode == "hold":
            log.write("ready", os.getpid())
            await trio.sleep_forever()
        else:
            if args.mode == "poison" and args.seed:
                await seed_poison(system, log)
                logged.set()
            await system.drain()
            print(json.dumps(statistics(system)), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stream", "drain", "poison", "hold"])
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("--run", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--per-session", type=int, default=400)
    parser.add_argument("--send-gap", type=float, default=0.002)
    parser.add_argument("--before", type=float, default=0.0, help="handler sleep before logging")
    parser.add_argument("--after", type=float, default=0.0, help="handler sleep after logging")
    parser.add_argument("--max-attempts", type=int, default=4)
    parser.add_argument("--seed", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
