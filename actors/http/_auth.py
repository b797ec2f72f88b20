"""Bearer tokens and their roles: who may read, send, or change the queue.

A role is a set of rights; each route needs one right. Tokens are looked
up in constant time per token (``hmac.compare_digest``), and every
configured token is compared, so a wrong token takes as long as a right
one of the same length. No token is ever logged or put in a URL.
"""

from __future__ import annotations

import enum
import hmac
import re
from collections.abc import Iterable, Mapping

import attrs


class Right(enum.Enum):
    """What a route needs."""

    READ = "read"  # status, sessions, dead letters, streams, metrics
    SEND = "send"  # send and ask
    ADMIN = "admin"  # retry dead letters, abort messages


class Role(enum.Enum):
    """What a token may do (``app(tokens={token: role})``, ``--token-file``).

    ``ALL``: everything (a bare ``token=``). ``ADMIN``: read, retry and
    abort. ``READ``: read only. ``SEND``: send and ask only.
    """

    ALL = "all"
    ADMIN = "admin"
    READ = "read"
    SEND = "send"


RIGHTS: Mapping[Role, frozenset[Right]] = {
    Role.ALL: frozenset(Right),
    Role.ADMIN: frozenset({Right.READ, Right.ADMIN}),
    Role.READ: frozenset({Right.READ}),
    Role.SEND: frozenset({Right.SEND}),
}

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 1024
# What may follow "Bearer ": RFC 6750's b64token, which a header carries as is.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")


def check_token(token: object) -> str:
    """Return ``token`` if it can be a bearer token, else raise.

    Raises:
      TypeError: not a str.
      ValueError: shorter than 16 or longer than 1024 characters, or
        holding a character a bearer token cannot (RFC 6750's b64token:
        letters, digits and ``-._~+/``, then ``=`` padding).
    """
    if not isinstance(token, str):
        raise TypeError(f"a token must be a str, got {type(token).__name__}")
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
        raise ValueError(
            f"a token must be {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH} characters long "
            f"(got {len(token)}): a short one can be guessed"
        )
    if not _TOKEN.match(token):
        raise ValueError("a token may hold letters, digits and -._~+/ (then = padding) only")
    return token


@attrs.frozen
class Tokens:
    """The configured tokens and their roles; :meth:`role` finds a presented one."""

    entries: tuple[tuple[bytes, Role], ...]

    @classmethod
    def build(
        cls,
        *,
        token: str | None,
        admin_token: str | None,
        read_token: str | None,
        tokens: Mapping[str, Role | str] | None,
    ) -> Tokens:
        """Check and gather every token given to ``app()``.

        Raises:
          TypeError / ValueError: a bad token or role (see check_token),
            one token given two roles, or no token at all.
        """
        pairs: list[tuple[str, Role]] = []
        for value, role in ((token, Role.ALL), (admin_token, Role.ADMIN), (read_token, Role.READ)):
            if value is not None:
                pairs.append((check_token(value), role))
        for value, named in (tokens or {}).items():
            pairs.append((check_token(value), Role(named)))
        roles: dict[str, Role] = {}
        for value, role in pairs:
            if roles.setdefault(value, role) is not role:
                raise ValueError("one token is given two roles")
        if not roles:
            raise ValueError(
                "give at least one token (token=, admin_token=, read_token= or tokens=): "
                "every endpoint but /healthz needs one"
            )
        return cls(tuple((value.encode("ascii"), role) for value, role in roles.items()))

    def role(self, authorization: str | None) -> Role | None:
        """The role of an ``Authorization: Bearer <token>`` header, None if it has none."""
        if authorization is None:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        candidate = presented.strip().encode("utf-8", "replace")
        found: Role | None = None
        for value, role in self.entries:  # all of them, whichever matches
            if hmac.compare_digest(value, candidate):
                found = role
        return found


def parse_token_lines(lines: Iterable[str]) -> dict[str, Role]:
    """Tokens of a token file: one a line, ``read:``, ``send:`` or ``admin:`` before
    a token limits its role, a bare token may do everything. Trailing whitespace,
    blank lines and lines starting with ``#`` are ignored.

    Raises:
      ValueError: a bad token (its line number said, never the token), or
        one token given twice.
    """
    found: dict[str, Role] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        prefix, colon, rest = line.partition(":")
        role = Role.ALL
        if colon and prefix in ("read", "send", "admin"):
            role, line = Role(prefix), rest
        try:
            check_token(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if line in found:
            raise ValueError(f"line {number}: this token was given before")
        found[line] = role
    return found
