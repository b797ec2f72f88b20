"""The endpoints: each turns a request into one call of the public System API.

Each endpoint checks its input before it calls the system (so that an
exception from the call is the system's answer, not a bad request), and
maps the library's exceptions to statuses in one place per call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import attrs
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import _admin
from .._codec import check_key, check_session_id, encode_body
from .._errors import (
    ActorsError,
    AskTimeoutError,
    DeadLetteredError,
    MessageTooLargeError,
    RemoteHandlerError,
    StoreError,
    SystemClosedError,
)
from .._system import System
from ._limits import (
    ENVELOPE_BYTES,
    MAX_OFFSET,
    MAX_PAGE,
    ApiError,
    envelope,
    parse_json,
    path_id,
    query_int,
    read_body,
    seconds_field,
)
from ._reads import dead_page, read, sessions_page
from ._sse import HEADERS as SSE_HEADERS
from ._sse import stream_events

log = logging.getLogger("actors.http")

DEFAULT_ASK_TIMEOUT = 30.0
MAX_ASK_TIMEOUT = 3600.0
MAX_RETRY_IDS = 1000


def json_response(value: Any, status: int = 200) -> Response:
    """``value`` as compact JSON (NaN refused: JSON has none)."""
    text = json.dumps(_admin.to_plain(value), ensure_ascii=False, allow_nan=False)
    return Response(text, status, media_type="application/json")


def error_response(status: int, reason: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": reason}, status, headers=headers)


def _session(request: Request) -> str:
    try:
        return check_session_id(request.path_params["session_id"])
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"bad session id: {exc}") from None


def _system_error(exc: SystemClosedError | StoreError) -> ApiError:
    """The status of the system's own refusals: it stops, or its database failed."""
    if isinstance(exc, SystemClosedError):
        return ApiError(503, "the system is shutting down")
    return ApiError(503, f"the database failed: {exc}")


@attrs.define
class Endpoints:
    """The endpoints of one app, over one system."""

    system: System
    stopping: trio.Event
    stall_after: float
    metrics: Any  # actors.prometheus.Metrics, or None without the extra
    open_streams: int = 0

    async def _json_body(self, request: Request, max_bytes: int = ENVELOPE_BYTES) -> Any:
        return parse_json(await read_body(request, max_bytes))

    def _message_body(self, value: Any) -> Any:
        try:
            encode_body(value, self.system.config.max_message_bytes)
        except MessageTooLargeError as exc:
            raise ApiError(413, str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"bad body: {exc}") from None
        return value

    def _message_limit(self) -> int:
        return self.system.config.max_message_bytes + ENVELOPE_BYTES

    async def send(self, request: Request) -> Response:
        session_id = _session(request)
        raw = await self._json_body(request, self._message_limit())
        fields = envelope(raw, ("body",), ("delay",))
        body = self._message_body(fields["body"])
        delay = seconds_field(fields, "delay", None)
        key = request.headers.get("idempotency-key")
        if key is not None:
            try:
                key = check_key(key)
            except (TypeError, ValueError) as exc:
                raise ApiError(400, f"bad Idempotency-Key: {exc}") from None
        try:
            message_id = await self.system.send(session_id, body, delay=delay, key=key)
        except (SystemClosedError, StoreError) as exc:
            raise _system_error(exc) from None
        return json_response({"id": message_id}, 202)

    async def ask(self, request: Request) -> Response:
        session_id = _session(request)
        raw = await self._json_body(request, self._message_limit())
        fields = envelope(raw, ("body",), ("timeout",))
        body = self._message_body(fields["body"])
        timeout = seconds_field(fields, "timeout", DEFAULT_ASK_TIMEOUT, MAX_ASK_TIMEOUT)
        try:
            value = await self.system.ask(session_id, body, timeout=timeout)
        except AskTimeoutError as exc:
            raise ApiError(504, str(exc)) from None
        except DeadLetteredError as exc:
            raise ApiError(409, str(exc)) from None
        except (SystemClosedError, StoreError) as exc:
            raise _system_error(exc) from None
        except RemoteHandlerError as exc:
            raise ApiError(500, f"the handler raised: {exc}") from None
        except ActorsError as exc:  # aborted or purged before it ran
            raise ApiError(409, str(exc)) from None
        except Exception as exc:  # the handler's own exception, as ask() raises it
            raise ApiError(500, f"the handler raised {type(exc).__name__}: {exc}") from None
        try:
            return json_response(value)
        except (TypeError, ValueError):
            raise ApiError(
                500, f"the handler returned a {type(value).__name__}, which is not JSON"
            ) from None

    def _stream(self, subscription: Any, kind_of: Any) -> Response:
        events = stream_events(subscription, kind_of, self.stopping)
        return StreamingResponse(
            self._counted(events), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def _counted(self, events: Any) -> Any:
        self.open_streams += 1
        try:
            async for chunk in events:
                yield chunk
        finally:
            self.open_streams -= 1
            await events.aclose()

    async def stream(self, request: Request) -> Response:
        session_id = _session(request)
        buffer = query_int(request, "buffer", 16, 1, 10_000)
        return self._stream(self.system.subscribe(session_id, buffer=buffer), _output_kind)

    async def events(self, request: Request) -> Response:
        buffer = query_int(request, "buffer", 1000, 1, 100_000)
        return self._stream(self.system.events(buffer=buffer), _event_kind)

    async def status(self, request: Request) -> Response:
        stats = attrs.asdict(self.system.statistics())
        health = await self._health()
        return json_response({**stats, "closed": self.system.closed, "health": health})

    async def _health(self) -> dict[str, Any]:
        if self.system.closed or self.stopping.is_set():
            return {"healthy": False, "reason": "stopped: the system is shutting down"}
        try:
            health = await self.system.health(stall_after=self.stall_after)
        except StoreError as exc:
            return {"healthy": False, "reason": f"the database failed: {exc}"}
        plain: dict[str, Any] = _admin.to_plain(health)
        return plain

    async def healthz(self, request: Request) -> Response:
        health = await self._health()
        verdict = {"healthy": health["healthy"], "reason": health["reason"]}
        return json_response(verdict, 200 if health["healthy"] else 503)

    async def sessions(self, request: Request) -> Response:
        limit = query_int(request, "limit", 100, 1, MAX_PAGE)
        offset = query_int(request, "offset", 0, 0, MAX_OFFSET)
        session_id = _query_session(request)
        now = self.system.now()
        page = await self._read(lambda views: sessions_page(views, now, offset, limit, session_id))
        return json_response(page)

    async def dead_letters(self, request: Request) -> Response:
        limit = query_int(request, "limit", 100, 1, MAX_PAGE)
        offset = query_int(request, "offset", 0, 0, MAX_OFFSET)
        session_id = _query_session(request)
        page = await self._read(lambda views: dead_page(views, offset, limit, session_id))
        return json_response(page)

    async def _read(self, reader: Any) -> Any:
        try:
            return await read(self.system, reader)
        except (StoreError, _admin.AdminError) as exc:
            raise ApiError(503, f"the database cannot be read: {exc}") from None

    async def retry(self, request: Request) -> Response:
        fields = envelope(await self._json_body(request), (), ("ids", "all"))
        ids = _retry_ids(fields)
        try:
            if ids is None:
                return json_response({"retried": await self.system.retry_dead(), "not_dead": []})
            retried, not_dead = 0, []
            for message_id in ids:
                count = await self.system.retry_dead(message_id)
                retried += count
                if not count:
                    not_dead.append(message_id)
        except (SystemClosedError, StoreError) as exc:
            raise _system_error(exc) from None
        return json_response({"retried": retried, "not_dead": not_dead})

    async def abort(self, request: Request) -> Response:
        message_id = path_id(request.path_params["message_id"])
        try:
            found = await self.system.abort(message_id)
        except (SystemClosedError, StoreError) as exc:
            raise _system_error(exc) from None
        except ValueError as exc:  # in flight
            raise ApiError(409, str(exc)) from None
        if not found:
            raise ApiError(404, f"no pending or dead message {message_id}")
        return json_response({"aborted": message_id})

    async def metrics_text(self, request: Request) -> Response:
        if self.metrics is None:
            raise ApiError(
                501, "metrics need the prometheus extra: pip install 'actors[prometheus]'"
            )
        import prometheus_client

        data = prometheus_client.generate_latest(self.metrics.registry)
        return Response(data, media_type=prometheus_client.CONTENT_TYPE_LATEST)


def _output_kind(value: Any) -> str:
    return "output"


def _event_kind(event: Any) -> str:
    kind: str = event.kind
    return kind


def _query_session(request: Request) -> str | None:
    text = request.query_params.get("session")
    if text is None:
        return None
    try:
        return check_session_id(text)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"bad session: {exc}") from None


def _retry_ids(fields: dict[str, Any]) -> list[int] | None:
    """The ids to retry, or None for all (exactly one of ``ids`` and ``all: true``)."""
    if ("ids" in fields) == (fields.get("all") is True):
        raise ApiError(400, 'give exactly one of "ids": [...] and "all": true')
    if "ids" not in fields:
        return None
    ids = fields["ids"]
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_RETRY_IDS:
        raise ApiError(400, f'"ids" must be a list of 1 to {MAX_RETRY_IDS} message ids')
    for item in ids:
        if type(item) is not int or not 1 <= item <= 2**63 - 1:
            raise ApiError(400, '"ids" must hold message ids (integers from 1)')
    return list(dict.fromkeys(ids))
