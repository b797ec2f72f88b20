"""Validation and encoding at the boundary: what may be sent, and how it is stored.

A body is stored as SQLite TEXT (JSON) or BLOB (``bytes`` as given), so the
column's own type says how to decode it and no flag column is needed.
"""

from __future__ import annotations

import json
import json.scanner
import re
from typing import Any

from ._errors import MessageTooLargeError

MAX_SESSION_ID_LENGTH = 256

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_decoder = json.JSONDecoder()

# The C halves of the two, built once: JSONEncoder.encode builds a C encoder
# per call (a third of a small body's cost), and JSONDecoder.decode wraps the
# scanner in Python. Without the circular check, a cycle ends in a
# RecursionError, which encode_body reports like the check's ValueError.
_c_encode: Any = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)
_c_make_scanner: Any = getattr(json.scanner, "c_make_scanner", None)
_scan_once: Any = _c_make_scanner(_decoder) if _c_make_scanner is not None else None


def encode_json(value: Any) -> str:
    """``value`` as compact JSON, through the C encoder built once (no checks)."""
    if _c_encode is None:  # pragma: no cover - CPython always has the C encoder
        return _encoder.encode(value)
    return "".join(_c_encode(value, 0))


# A key that json may have made from a non-str key (an int, a float, true,
# false or null): in quotes, followed by the key separator. Inside a JSON
# string a quote is escaped, so only object keys match (a str key that
# looks like one is a false alarm, which costs a walk). The lookahead turns
# most quotes away at their first character: twice as fast as the bare
# alternation (0.9 against 1.9 us for a body of 11 small dicts, 0.19
# against 0.29 for a dict of two keys).
_KEY_FROM_NON_STR = re.compile(r'"(?=[-0-9tfn])(?:[-0-9][-0-9.eE+]*|true|false|null)":')
_CONTAINERS = (dict, list, tuple)


def check_encoded(value: Any, text: str, what: str) -> None:
    """Refuse what ``text`` (``encode_json(value)``) would lose or cannot store.

    json makes int, float, bool and None keys strings without a word, so
    ``{1: "a", "1": "b"}`` encodes to two ``"1"`` keys, and decodes to one:
    a value silently dropped. Text with a lone surrogate is not UTF-8, which
    SQLite stores. The common case pays one regex scan of the text (about
    0.2 us for a small dict, 0.9 for eleven); the value is walked only when
    a key in the text may have come from a non-str key.

    Raises:
      TypeError: dict keys that collide once made strings, or text that
        is not valid Unicode.
    """
    if _KEY_FROM_NON_STR.search(text) is not None:
        _check_keys(value, what)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError(
                f"{what} contains text that is not valid Unicode (a lone surrogate)"
            ) from None


def _check_keys(value: Any, what: str) -> None:
    # Iterative: the encoder accepted the nesting, a recursion here might not.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(type(key) is str for key in item):
                names: dict[str, Any] = {}
                for key in item:
                    name = _key_text(key)
                    if name in names:
                        raise TypeError(
                            f"{what} has dict keys {names[name]!r} and {key!r}, which are both "
                            f"{name!r} in JSON (one value would be lost)"
                        )
                    names[name] = key
            stack.extend(v for v in item.values() if isinstance(v, _CONTAINERS))
        elif isinstance(item, (list, tuple)):
            stack.extend(v for v in item if isinstance(v, _CONTAINERS))


def _key_text(key: Any) -> str:
    """The text json makes of a dict key (as its C encoder does)."""
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, float):
        return float.__repr__(key)
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    return int.__repr__(key)  # (the encoder accepted it: an int)


def check_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a usable key, else raise.

    Raises:
      TypeError: not a ``str``.
      ValueError: empty, longer than 256 characters, containing NUL, or not
        encodable as UTF-8 (a lone surrogate).
    """
    if type(session_id) is not str:
        if isinstance(session_id, str):  # a str subclass: store the plain value
            session_id = str.__str__(session_id)
        else:
            raise TypeError(f"session_id must be a str, got {type(session_id).__name__}")
    assert isinstance(session_id, str)
    if not session_id:
        raise ValueError("session_id must not be empty")
    if len(session_id) > MAX_SESSION_ID_LENGTH:
        raise ValueError(
            f"session_id is {len(session_id)} characters; the limit is {MAX_SESSION_ID_LENGTH}"
        )
    if "\x00" in session_id:
        raise ValueError("session_id must not contain NUL characters")
    if not session_id.isascii():
        try:
            session_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("session_id is not valid Unicode text (lone surrogate)") from None
    return session_id


MAX_KEY_LENGTH = 256


def check_key(key: object) -> str:
    """Return ``key`` if it is a usable idempotency key, else raise.

    Raises:
      TypeError: not a ``str``.
      ValueError: empty, longer than 256 characters, or containing NUL.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    key = str.__str__(key)
    if not key:
        raise ValueError("key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"key is {len(key)} characters; the limit is {MAX_KEY_LENGTH}")
    if "\x00" in key:
        raise ValueError("key must not contain NUL characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("key is not valid Unicode text (lone surrogate)") from None
    return key


_BYTES_TYPES = (bytes, bytearray, memoryview)  # (a tuple: ``A | B`` builds a union per call)


def encode_body(body: Any, max_bytes: int) -> str | bytes:
    """Encode a body for storage: ``bytes`` as they are, anything else as JSON.

    Raises:
      TypeError: the body is not JSON-compatible (unsupported type, NaN or
        infinity, a cycle, text that is not valid Unicode, dict keys that
        collide once made strings, as ``{1: "a", "1": "b"}``).
      MessageTooLargeError (a ValueError): the encoding is over ``max_bytes``.
    """
    if isinstance(body, _BYTES_TYPES):
        data: str | bytes = bytes(body)
        size = len(data)
    else:
        try:
            text = encode_json(body)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(f"message body is not JSON-compatible: {exc}") from None
        size = len(text)
        if isinstance(body, _CONTAINERS) and _KEY_FROM_NON_STR.search(text) is not None:
            _check_keys(body, "message body")
        if not text.isascii():
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise TypeError(
                    "message body contains text that is not valid Unicode (a lone surrogate)"
                ) from None
        data = text
    if size > max_bytes:
        raise MessageTooLargeError(
            f"message body is {size} bytes encoded; max_message_bytes is {max_bytes}"
        )
    return data


def decode_body(raw: object) -> Any:
    """Decode a stored body. Raises ValueError with the reason if it cannot."""
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        if _scan_once is not None:
            # What encode_body wrote has no surrounding whitespace: the bare
            # scanner reads it; anything else takes the full decoder's path.
            try:
                value, end = _scan_once(raw, 0)
            except (StopIteration, json.JSONDecodeError):
                pass
            else:
                if end == len(raw):
                    return value
        try:
            return _decoder.decode(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"stored body is not valid JSON: {exc}") from None
    raise ValueError(f"stored body has unexpected SQLite type {type(raw).__name__}")
