"""What a request may be: its size, its JSON, its fields; errors as ``{"error": ...}``.

Every refusal is an :class:`ApiError` with a status and a one-line reason;
the app turns it into a JSON response. Nothing here echoes a token or a
traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request

from .._validate import MAX_SECONDS

# Room around a message body for the rest of a request's JSON (the
# envelope's keys, a delay, whitespace).
ENVELOPE_BYTES = 64 * 1024
# Deeper JSON than any sane message; json's own recursion would refuse
# some thousands of levels with a RecursionError, this refuses clearly.
MAX_JSON_DEPTH = 100
MAX_PAGE = 1000
MAX_OFFSET = 1_000_000


class ApiError(Exception):
    """A request refused: ``status`` and the reason shown as ``{"error": reason}``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, at most ``max_bytes`` (413 beyond, read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, f"the request body is over {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"the request body is over {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        # The client left, or sent too slowly (the server's read timeout):
        # nothing was done, and nobody reads the answer; not a server error.
        raise ApiError(408, "the request body did not arrive in time") from None
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    """Decode a JSON request body (400 if it is not JSON, or nested too deep)."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # (JSONDecodeError is a ValueError)
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ApiError(400, f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (0 for a scalar); iterative."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def envelope(value: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object, with its ``required`` keys and no unknown ones."""
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    missing = [k for k in required if k not in value]
    if missing:
        raise ApiError(400, f"the body has no {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(repr(k) for k in unknown)}")
    return value


def seconds_field(
    fields: Mapping[str, Any], name: str, default: float | None, maximum: float = MAX_SECONDS
) -> float | None:
    """A field of seconds: a finite number from 0 to ``maximum`` (or absent/null)."""
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"{name!r} must be a number of seconds")
    if not (math.isfinite(value) and 0 <= value <= maximum):
        raise ApiError(400, f"{name!r} must be from 0 to {maximum:g} seconds")
    return float(value)


def query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    """An integer query parameter in a range (400 otherwise)."""
    text = request.query_params.get(name)
    if text is None:
        return default
    if (
        not (text.isascii() and text.isdigit())
        or len(text) > 20
        or not minimum <= int(text) <= maximum
    ):
        raise ApiError(400, f"{name!r} must be an integer from {minimum} to {maximum}")
    return int(text)


def path_id(text: str) -> int:
    """A message id from the path: 1 to 2**63 - 1 (404 for anything else: no such message)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or not 1 <= int(text) <= 2**63 - 1:
        raise ApiError(404, f"no message {text!r}: an id is an integer from 1")
    return int(text)
