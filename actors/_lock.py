"""One running system per database file: an advisory lock on a sidecar file.

``flock`` locks belong to an open file description, so a second lock attempt
conflicts whether it comes from another process or from this one, and the
kernel drops the lock when the process dies, however it dies.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket

from ._errors import DatabaseInUseError


class DatabaseLock:
    """Holds ``<database>.lock`` exclusively while a system runs."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.path = db_path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DatabaseInUseError naming the owner."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
            raise DatabaseInUseError(self.db_path, owner or "owner unknown") from None
        except BaseException:
            os.close(fd)
            raise
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        info = f"pid {os.getpid()} on {socket.gethostname()}, started {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays; it is harmless unlocked."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            os.close(fd)
