"""Hold a database's write lock from another connection, as another writer would.

While it is held, the store's next transaction cannot begin: the committer
hands the group to a worker thread, which waits for the lock up to
``busy_timeout`` (the loop keeps running). Tests use it to keep a batch
"committing" for as long as they need.
"""

from __future__ import annotations

import apsw


class WriteLock:
    """``BEGIN IMMEDIATE`` on a second connection until ``release()``."""

    def __init__(self, path: str) -> None:
        self._db: apsw.Connection | None = apsw.Connection(path)
        self._db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        """Roll back and close; safe to call twice, and from any thread."""
        db, self._db = self._db, None
        if db is not None:
            db.execute("ROLLBACK")
            db.close()

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
