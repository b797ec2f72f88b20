"""``app()``: the ASGI application over a running system.

Built on Starlette (which runs on trio through anyio), so it serves from
hypercorn's trio worker on the loop that runs the system, or mounts in a
user's own ASGI server on that loop. Every route names the right it needs;
the guard in front of it checks the bearer token before the endpoint sees
the request. Errors are ``{"error": ...}`` JSON, never a traceback; no
CORS headers are sent (browsers on other origins are refused).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .._system import System
from .._validate import check_seconds
from ._auth import RIGHTS, Right, Role, Tokens
from ._dashboard import page, script, styles
from ._limits import ApiError
from ._routes import Endpoints, error_response

log = logging.getLogger("actors.http")

Endpoint = Callable[[Request], Awaitable[Response]]


@attrs.frozen
class HttpStatistics:
    """One HTTP app right now (``HttpApp.statistics()``).

    Attributes:
      requests: requests answered since the app was built.
      by_status: how many got each status (``{202: 10, 401: 1}``).
      unauthorized: requests refused for a missing or wrong token (401).
      forbidden: requests refused because the token's role lacks the right (403).
      open_streams: Server-Sent Event streams open now.
      stopping: whether :meth:`HttpApp.stop` ran (streams end, /healthz says 503).
    """

    requests: int
    by_status: dict[int, int]
    unauthorized: int
    forbidden: int
    open_streams: int
    stopping: bool


class HttpApp(Starlette):
    """The ASGI application that :func:`app` builds (a Starlette application)."""

    def __init__(self, endpoints: Endpoints, tokens: Tokens) -> None:
        self._endpoints = endpoints
        self._tokens = tokens
        self._statuses: Counter[int] = Counter()
        super().__init__(
            routes=_routes(endpoints, self._guard),
            exception_handlers={
                ApiError: _api_error,
                HTTPException: _http_error,
                Exception: _server_error,
            },
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._statuses[message["status"]] += 1
            await send(message)

        await super().__call__(scope, receive, counting_send)

    def _guard(self, right: Right, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the bearer token check for ``right``."""
        tokens = self._tokens

        async def guarded(request: Request) -> Response:
            role = tokens.role(request.headers.get("authorization"))
            if role is None:
                raise ApiError(401, "a valid token is needed: Authorization: Bearer <token>")
            if right not in RIGHTS[role]:
                article = "an" if role.value[0] in "aeiou" else "a"
                raise ApiError(403, f"{article} {role.value} token may not {right.value}")
            return await endpoint(request)

        return guarded

    def stop(self) -> None:
        """End the open event streams (each with an ``end`` event); /healthz turns 503.

        For a graceful stop of the server: long-lived streams would hold
        it up until its grace period ends. Requests go on being served.
        """
        self._endpoints.stopping.set()

    def statistics(self) -> HttpStatistics:
        """Requests by status, refusals, open streams."""
        statuses = dict(self._statuses)
        return HttpStatistics(
            requests=sum(statuses.values()),
            by_status=statuses,
            unauthorized=statuses.get(401, 0),
            forbidden=statuses.get(403, 0),
            open_streams=self._endpoints.open_streams,
            stopping=self._endpoints.stopping.is_set(),
        )


def _routes(e: Endpoints, guard: Callable[[Right, Endpoint], Endpoint]) -> list[Route]:
    read, send, admin = Right.READ, Right.SEND, Right.ADMIN
    session = "/v1/sessions/{session_id:path}"
    table: list[tuple[str, str, Right | None, Endpoint]] = [
        ("POST", f"{session}/messages", send, e.send),
        ("POST", f"{session}/ask", send, e.ask),
        ("GET", f"{session}/stream", read, e.stream),
        ("GET", "/v1/events", read, e.events),
        ("GET", "/v1/status", read, e.status),
        ("GET", "/v1/sessions", read, e.sessions),
        ("GET", "/v1/dead-letters", read, e.dead_letters),
        ("POST", "/v1/dead-letters/retry", admin, e.retry),
        ("POST", "/v1/messages/{message_id}/abort", admin, e.abort),
        ("GET", "/metrics", read, e.metrics_text),
        ("GET", "/healthz", None, e.healthz),
        # The dashboard's files need no token: the page asks for one and
        # sends it to /v1 in a header (see _dashboard.py).
        ("GET", "/", None, page),
        ("GET", "/dashboard.css", None, styles),
        ("GET", "/dashboard.js", None, script),
    ]
    return [
        Route(path, endpoint if right is None else guard(right, endpoint), methods=[method])
        for method, path, right, endpoint in table
    ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.reason, headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reasons = {404: "no such route", 405: "method not allowed on this route"}
    reason = reasons.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, reason, exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error (logged by the server)")


def _instrument(system: System) -> Any:
    """A Prometheus collector on a registry of this app's own, or None without the extra."""
    try:
        import prometheus_client

        from .. import prometheus
    except ImportError:
        return None
    return prometheus.instrument(system, registry=prometheus_client.CollectorRegistry())


def app(
    system: System,
    *,
    token: str | None = None,
    admin_token: str | None = None,
    read_token: str | None = None,
    tokens: Mapping[str, Role | str] | None = None,
    stall_after: float = 60.0,
) -> HttpApp:
    """The HTTP API of a running ``system``, as an ASGI application.

    Serve it on the trio loop that runs ``system`` (from inside its
    ``async with run_system(...)`` block), with hypercorn's trio worker
    (``hypercorn.trio.serve``) or any ASGI server that runs on trio.

    Every endpoint but ``/healthz`` needs ``Authorization: Bearer <token>``.
    ``token`` may do everything; ``admin_token`` may read, retry and abort;
    ``read_token`` may only read. ``tokens`` maps more tokens to a role
    (:class:`Role` or its value: ``"all"``, ``"admin"``, ``"read"``,
    ``"send"``); a send token may only send and ask. ``stall_after``: as
    :meth:`actors.System.health`, for ``/healthz`` and ``/v1/status``.

    With the prometheus extra installed, ``/metrics`` serves the system's
    metrics (:func:`actors.prometheus.instrument` on a registry of the
    app's own, from now on).

    Raises:
      TypeError / ValueError: no token at all; a token under 16 or over
        1024 characters, or with a character a bearer token cannot hold;
        an unknown role; one token given two roles; a bad ``stall_after``.
    """
    found = Tokens.build(token=token, admin_token=admin_token, read_token=read_token, tokens=tokens)
    stall_after = check_seconds("stall_after", stall_after, positive=True)
    endpoints = Endpoints(system, trio.Event(), stall_after, _instrument(system))
    return HttpApp(endpoints, found)
