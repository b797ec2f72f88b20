"""The ceiling server of ``python -m benchmarks.http``: actors.http's own stack, no system.

``python -m benchmarks.http_ceiling --port 0 --token-file F`` serves the
very ``HttpApp`` that ``actors serve`` serves (``actors.http``'s routes,
its status counting, its bearer-token guard, the body read with its size
limit, the JSON parse and depth check, the envelope and body checks, the
``Idempotency-Key`` check, the ``{"id": n}`` JSON answer), with
``actors.http.serve`` (hypercorn's trio worker, the same config, no access
log), on one trio loop, in one process. What it lacks is the system: its
``send`` returns the next integer at once, so nothing is written, no
transaction commits, no actor runs a handler on the loop, no group commit
or store thread wakes. The difference between the two servers is what a
durable send costs over HTTP, and what the handlers' dispatch takes from
the same core.

``--wait-ms W`` makes the stand-in ``send`` sleep W ms before it answers,
costing no CPU: the ``ceiling_wait`` scenario. Under wrk's closed loop an
answer that comes at once is answered alone, and the next request of its
connection comes alone too; a send that waits (as a durable one waits for
its group commit) lets the requests of many connections arrive and be
served together, which costs the stack less CPU per request. The stack's
ceiling is the better of the two.

It prints ``serving ceiling on http://HOST:PORT`` on stderr once listening
(the line ``actors serve`` prints), and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from typing import Any

import trio

from actors._config import Config
from actors.http import parse_token_lines, serve
from actors.http._app import HttpApp
from actors.http._auth import Tokens
from actors.http._routes import Endpoints


class NoSystem:
    """What the send endpoint uses of a System: its config, and a ``send`` that persists nothing."""

    def __init__(self, wait: float) -> None:
        self.config = Config()
        self.sent = 0
        self.wait = wait

    async def send(self, session_id: str, body: Any, *, delay: Any = None, key: Any = None) -> int:
        self.sent += 1
        if self.wait:
            await trio.sleep(self.wait)
        return self.sent


def ceiling_app(tokens: dict[str, Any], wait: float) -> HttpApp:
    endpoints = Endpoints(NoSystem(wait), trio.Event(), 60.0, None)  # type: ignore[arg-type]
    found = Tokens.build(token=None, admin_token=None, read_token=None, tokens=tokens)
    return HttpApp(endpoints, found)


async def run(host: str, port: int, tokens: dict[str, Any], wait: float) -> None:
    api = ceiling_app(tokens, wait)
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            start = partial(serve, api, host=host, port=port, shutdown_trigger=stop.wait)
            binds = await nursery.start(start)
            print(f"actors: serving ceiling on {' '.join(binds)}", file=sys.stderr, flush=True)
            async for _ in signals:
                break
            stop.set()
    print("actors: stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_ceiling")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token-file", required=True)
    p.add_argument("--wait-ms", type=float, default=0.0, help="send() sleeps this long (0)")
    args = p.parse_args(argv)
    with open(args.token_file, encoding="utf-8") as f:
        tokens = parse_token_lines(f)
    trio.run(run, args.host, args.port, tokens, args.wait_ms / 1e3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
