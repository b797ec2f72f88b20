"""What names a PostgreSQL database, and how it is shown: no psycopg needed.

The command line and ``run_system`` decide between SQLite and PostgreSQL by
the target's text before anything is opened; an SQLite user, without the
postgres extra, never imports psycopg. A URL may carry a password (in its
user part, or as a ``password`` parameter): every message shows it
:func:`redact`-ed, and a text that libpq or psycopg wrote about the URL
(which can quote the whole URL) goes through :func:`hide_password`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")
_HIDDEN = "***"
_USERINFO = re.compile(r"^[A-Za-z]+://([^@/?#]*)@")
_PARAMETER = re.compile(r"([?&]password=)([^&#]*)")


def is_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL database (rather than an SQLite file)."""
    return isinstance(target, str) and target.startswith(SCHEMES)


def _passwords(url: str) -> list[str]:
    """The password of ``url`` as written and decoded (both may appear in a text)."""
    found = []
    userinfo = _USERINFO.match(url)
    if userinfo is not None and ":" in userinfo.group(1):
        found.append(userinfo.group(1).split(":", 1)[1])
    found += [m.group(2) for m in _PARAMETER.finditer(url)]
    return [p for text in found if text for p in {text, unquote(text)} if p]


def hide_password(text: str, url: str) -> str:
    """``text`` with every occurrence of ``url``'s password replaced by ``***``."""
    for password in sorted(_passwords(url), key=len, reverse=True):
        text = text.replace(password, _HIDDEN)
    return text


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    shown = _PARAMETER.sub(rf"\g<1>{_HIDDEN}", url)
    try:
        parts = urlsplit(shown)
        if parts.password is None:
            return hide_password(shown, url)
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(
            (parts.scheme, f"{user}:{_HIDDEN}@{netloc[1]}", parts.path, parts.query, parts.fragment)
        )
    except ValueError:
        return "postgresql://(unparsable URL)"
