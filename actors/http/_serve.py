"""Serving the app with hypercorn's trio worker, and ``actors serve``'s whole run.

``serve()`` runs the HTTP server on the current trio loop until its
shutdown trigger fires, then lets open requests finish within ``grace``.
``run_server()`` is ``actors serve``: the system and the server in one
process, stopped gracefully by SIGTERM or SIGINT.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._run import run_system
from ._app import HttpApp, app
from ._auth import Role

log = logging.getLogger("actors.http")


async def serve(
    api: HttpApp | Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 10.0,
    read_timeout: float | None = 30.0,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``api`` with hypercorn's trio worker on ``host:port`` (0: a free port).

    Use ``await nursery.start(serve, api, ...)``: it starts once listening,
    with the addresses served (``["http://127.0.0.1:8000"]``). Returns
    after ``shutdown_trigger()`` returns (never without one) and the open
    requests finished, or ``grace`` seconds passed; the app's event streams
    end at once (:meth:`HttpApp.stop`). No access log: a request's headers
    (its token) are never logged. ``api`` may also be an application of
    yours that mounts the one of :func:`app`: call that one's ``stop()``
    yourself when the shutdown comes, or its event streams hold the stop
    for ``grace`` seconds. A client that sends nothing for
    ``read_timeout`` seconds in the middle of a request loses its
    connection (None: never), so slow clients cannot hold the server's
    connections.
    """
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace
    config.read_timeout = read_timeout  # type: ignore[assignment]  # (typed int; any number works)
    config.accesslog = None
    config.errorlog = log

    async def trigger() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        if isinstance(api, HttpApp):
            api.stop()

    await hypercorn_serve(api, config, shutdown_trigger=trigger, task_status=task_status)  # type: ignore[arg-type]


def load_handler(spec: str) -> Any:
    """The object named ``package.module:attribute`` (the current directory is importable).

    Raises:
      ValueError: not of that form, no such module, or no such attribute.
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{spec!r} is not package.module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no {attribute!r}") from None
    return value


def new_token_file(path: str) -> str:
    """Write a fresh token to ``path``, readable by its owner only (0600); return it."""
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # (an existing file keeps its mode through O_CREAT)
        os.write(fd, f"{token}\n".encode())
    finally:
        os.close(fd)
    return token


async def run_server(
    target: str,
    handler: Any,
    *,
    host: str,
    port: int,
    tokens: dict[str, Role],
    options: dict[str, Any],
    out: Callable[[str], None],
    read_timeout: float | None = 30.0,
) -> None:
    """Run the system on ``target`` and serve its API until SIGTERM or SIGINT.

    On the signal: the event streams end, the server takes no new
    connection, the system stops (no handler starts; running ones get
    ``shutdown_timeout`` seconds, their acknowledgements commit), and the
    requests still open finish or are cut within that grace.
    """
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # The server runs in the outer nursery, outside the system's block:
        # the system stops at the signal while the server finishes its
        # open requests (which the stopping system answers with 503).
        async with (
            trio.open_nursery() as nursery,
            run_system(target, handler=handler, **options) as system,
        ):
            api = app(system, tokens=tokens)
            grace = system.config.shutdown_timeout
            start = partial(
                serve, api, host=host, port=port, grace=grace, read_timeout=read_timeout
            )
            binds = await nursery.start(partial(start, shutdown_trigger=stop.wait))
            out(f"serving {system.path} on {' '.join(binds)}")
            async for signum in signals:
                out(f"{signal.Signals(signum).name}: stopping (grace {grace:g}s)")
                break
            api.stop()
            stop.set()
    out("stopped")
