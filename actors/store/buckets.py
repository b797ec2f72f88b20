"""How sessions map to a cluster's buckets (no database client needed).

``run_system`` checks the ``buckets`` option with it before anything
imports psycopg, and the PostgreSQL store hashes sessions with it.
"""

from __future__ import annotations

import zlib

DEFAULT_BUCKETS = 1024
MAX_BUCKETS = 1 << 16


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
