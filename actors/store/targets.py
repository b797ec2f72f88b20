"""What names a database, and how sessions map to a cluster's buckets.

Free of any database client: ``run_system`` and the command line decide
with it whether a target is a PostgreSQL URL before anything imports
psycopg (an SQLite user need not have it).
"""

from __future__ import annotations

import zlib
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BUCKETS = 1024
MAX_BUCKETS = 1 << 16


def is_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL database (rather than an SQLite file)."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(
            (parts.scheme, f"{user}:***@{netloc[1]}", parts.path, parts.query, parts.fragment)
        )
    except ValueError:
        return "postgresql://(unparsable URL)"


def bucket_of(session_id: str, buckets: int) -> int:
    """The bucket of a session: the same in every process, on every host."""
    return zlib.crc32(session_id.encode("utf-8", "surrogatepass")) % buckets


def check_buckets(buckets: object) -> int | None:
    """Validate the ``buckets`` option (None: the database's, or the default)."""
    if buckets is None:
        return None
    if type(buckets) is not int:
        raise TypeError(f"buckets must be an int, got {type(buckets).__name__}")
    if not 1 <= buckets <= MAX_BUCKETS:
        raise ValueError(f"buckets must be between 1 and {MAX_BUCKETS}, got {buckets}")
    return buckets
