"""A child process for tests/test_exactly_once.py: effectively-once under SIGKILL.

    python exactly_once_child.py MODE DB LOG --run=N --seed=S [--resend=FILE]

The workload has two kinds of sessions:

- counters ``c0`` .. ``c3``: the handler adds the message's value to
  ``ctx.state["total"]`` and counts it in ``ctx.state["n"]``;
- chains ``a<i> -> b<i> -> z<i>``: ``a`` and ``b`` count the message and
  forward it with ``ctx.send``; ``z`` records its uid in
  ``ctx.state["seen"]`` (``{uid: times}``).

Every message body is ``{"u": uid, "v": value}`` and is sent with
``key=uid``. A producer that did not see its send acknowledged (the process
died while it waited) sends it again, with the same key, in the next run:
the parent passes those in ``--resend`` (a JSON list of ``[uid, session,
value]``), and the child sends them before anything new.

Every line written to LOG is one ``write()`` on a file opened with O_APPEND:
a SIGKILL never leaves half a line, and a line is on file before the code
after it runs. Lines:

    run <run> <pid>                        at start, before recovery
    ready <run> <recovered>                the system runs
    sending <uid> <session> <value>        before send()
    acked <uid> <id>                       after send() returned
    applied <session> <uid> <attempt>      the handler made its changes (not yet committed)

Modes:
  stream  resend, then one sender per first-hop session sends forever
          (pausing while the backlog is over --max-pending): the parent kills it.
  drain   resend, wait until nothing is pending or in flight, print the
          statistics as JSON, exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from progress import Log, Room  # the script's own folder

import actors
import actors.testing

COUNTERS = [f"c{i}" for i in range(4)]
CHAINS = 2
FIRST_HOPS = COUNTERS + [f"a{i}" for i in range(CHAINS)]
NEXT_HOP = {"a": "b", "b": "z"}


room = Room()


def apply(ctx: actors.Context, msg: actors.Message) -> None:
    """The workload's changes: count (and forward) the message, or record its uid."""
    state = ctx.state
    session = ctx.session_id
    kind = session[0]
    if kind == "c":
        state["total"] = state.get("total", 0) + msg.body["v"]
        state["n"] = state.get("n", 0) + 1
    elif kind in NEXT_HOP:
        state["n"] = state.get("n", 0) + 1
        ctx.send(NEXT_HOP[kind] + session[1:], msg.body)
    else:
        seen = state.setdefault("seen", {})
        uid = msg.body["u"]
        seen[uid] = seen.get(uid, 0) + 1


def make_handler(
    log: Log, rng: random.Random, latency: float
) -> Callable[[actors.Context, actors.Message], Awaitable[None]]:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        room.poke()
        uid = msg.body["u"]
        session = ctx.session_id
        # Killed here: nothing was applied.
        await trio.sleep(rng.uniform(0, latency))
        apply(ctx, msg)
        log.write("applied", session, uid, msg.attempt)
        # Killed here: applied in memory, not committed. The redelivery must
        # apply it to the committed state, which does not have it.
        await trio.sleep(rng.uniform(0, latency))

    return handler


async def send(system: actors.System, log: Log, uid: str, session: str, value: int) -> None:
    log.write("sending", uid, session, value)
    message_id = await system.send(session, {"u": uid, "v": value}, key=uid)
    log.write("acked", uid, message_id)


async def resend(system: actors.System, log: Log, items: list[list[Any]]) -> None:
    async with trio.open_nursery() as nursery:
        for uid, session, value in items:
            nursery.start_soon(send, system, log, uid, session, value)


async def sender(
    system: actors.System, log: Log, args: argparse.Namespace, session: str, rng: random.Random
) -> None:
    k = 0
    while True:
        await room.wait(system, args.max_pending)
        await send(system, log, f"r{args.run}-{session}-{k}", session, rng.randint(1, 10**6))
        k += 1
        await trio.sleep(rng.uniform(0, args.send_gap))


async def main(args: argparse.Namespace) -> None:
    log = Log(args.log)
    rng = random.Random(args.seed)
    log.write("run", args.run, os.getpid())
    async with actors.run_system(
        args.db,
        handler=make_handler(log, random.Random(rng.random()), args.latency),
        rng=random.Random(rng.random()),
        # Kills, not handler failures, are what this is about: never let a
        # message that was in flight at many kills run out of attempts.
        **actors.testing.fast_options(max_attempts=10**6),
    ) as system:
        log.write("ready", args.run, system.recovered)
        await resend(system, log, args.resend_items)
        if args.mode == "stream":
            async with trio.open_nursery() as nursery:
                for session in FIRST_HOPS:
                    nursery.start_soon(
                        sender, system, log, args, session, random.Random(rng.random())
                    )
        else:
            stats = await actors.testing.quiescent(system)
            print(
                json.dumps(
                    {
                        "recovered": system.recovered,
                        "pending": stats.pending,
                        "in_flight": stats.in_flight,
                        "dead": stats.dead,
                        "processed": stats.processed,
                    }
                ),
                flush=True,
            )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["stream", "drain"])
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--resend", default=None)
    parser.add_argument("--send-gap", type=float, default=0.003)
    parser.add_argument("--latency", type=float, default=0.0015)
    parser.add_argument("--max-pending", type=int, default=100)
    args = parser.parse_args(argv)
    args.resend_items = []
    if args.resend is not None:
        with open(args.resend) as f:
            args.resend_items = json.load(f)
    return args


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
