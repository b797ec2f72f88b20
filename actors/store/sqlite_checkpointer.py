"""WAL checkpoints beside the commits: the bulk in a thread of its own.

A checkpoint copies the WAL's pages into the database file; while the store
runs one on its own connection, no commit runs (about 4 us per WAL frame
here: 4-7 ms at 1,000 pages, the p99 of ``send()``). So the bulk runs here,
a PASSIVE checkpoint on a connection of this thread's own, while commits go
on (WAL mode lets one checkpointer and one writer work at once). It copies
what was committed before it started. Alone it would never let the WAL
start over, since commits keep adding frames; so when it has finished, the
store runs a second, short checkpoint on its own connection between two
transactions (only the frames added meanwhile, well under a millisecond),
after which the next commit rewinds the WAL (``SqliteTransactions.maintain``).
"""

from __future__ import annotations

import logging
import threading
from logging import DEBUG

import apsw

from .errors import log_exceptions

log = logging.getLogger("actors.store")


class Checkpointer:
    """A daemon thread that runs PASSIVE checkpoints of one database on request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.finished = 0  # passes that ran to the end (read by the store)
        self._wake = threading.Event()
        self._stopping = False
        self._running = False  # a pass was requested and has not finished
        self._thread = threading.Thread(
            target=self._main, name=f"actors-checkpoint:{path}", daemon=True
        )
        self._thread.start()

    def request(self) -> None:
        """Start a pass, unless one is under way."""
        if self._running or self._stopping:
            return
        self._running = True
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (after a pass under way) and close its connection."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _main(self) -> None:
        db: apsw.Connection | None = None
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                try:
                    # Nothing is lost if it fails: the pages stay in the WAL.
                    with log_exceptions(log, f"a checkpoint of {self.path!r} did not run", DEBUG):
                        if db is None:
                            db = apsw.Connection(self.path)
                            # A connection learns that the file is in WAL mode
                            # (and opens the WAL) at its first read; until then
                            # a checkpoint does nothing and reports -1.
                            db.execute("SELECT count(*) FROM sqlite_master").fetchall()
                        db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
                        self.finished += 1
                finally:
                    self._running = False
        finally:
            if db is not None:
                with log_exceptions(
                    log, f"closing the checkpoint connection of {self.path!r}", DEBUG
                ):
                    db.close()
