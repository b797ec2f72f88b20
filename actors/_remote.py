"""The outcome of a handler, written for an ``ask()`` waiting in another process.

A cluster's processes share no memory: the process that ran the handler
writes its outcome into the database as JSON, and the asking process makes
of it what ``ask()`` returns or raises. A value crosses as the message
bodies do (JSON, or bytes); an exception as its type's name and text
(:class:`~actors.RemoteHandlerError`); a dead-lettering as its reason.
"""

from __future__ import annotations

import base64
from typing import Any

from ._codec import decode_body, encode_body, encode_json
from ._errors import DeadLetteredError, RemoteHandlerError


def value_outcome(value: Any, max_bytes: int) -> str:
    """The JSON of a returned value (an error outcome if it cannot cross)."""
    try:
        body = encode_body(value, max_bytes)
    except (TypeError, ValueError) as exc:
        return error_outcome(
            "TypeError",
            f"the handler's return value cannot be sent to the asking process: {exc}",
        )
    if isinstance(body, bytes):
        return encode_json({"bytes": base64.b64encode(body).decode("ascii")})
    return encode_json({"json": body})


def error_outcome(type_name: str, text: str) -> str:
    return encode_json({"error": type_name, "text": text})


def dead_outcome(reason: str) -> str:
    return encode_json({"dead": reason})


def decode_value(outcome: str) -> Any:
    """The value of a value outcome.

    Raises:
      ValueError: not a value outcome (an error one says why in its text).
    """
    return _value_of(decode_body(outcome))


def _value_of(data: Any) -> Any:
    if "json" in data:
        return decode_body(data["json"])
    if "bytes" in data:
        return base64.b64decode(data["bytes"])
    raise ValueError(str(data.get("text", "not a value")))


def settle(reply: Any, message_id: int, outcome: str) -> None:
    """Set ``reply`` (a Reply) from an outcome's JSON."""
    try:
        data = decode_body(outcome)
        if "dead" in data:
            reply.set_error(DeadLetteredError(message_id, str(data["dead"])))
        elif "error" in data:
            reply.set_error(RemoteHandlerError(message_id, str(data["error"]), str(data["text"])))
        else:
            reply.set_result(_value_of(data))
    except (ValueError, TypeError, KeyError) as exc:
        reply.set_error(RemoteHandlerError(message_id, "ValueError", f"unreadable answer: {exc}"))
