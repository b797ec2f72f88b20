"""An apsw VFS shim that injects storage faults on command.

:class:`FaultVFS` inherits every operation from the VFS that was the default
when it was created (``unix`` on Linux) and registers itself as the new
default, so a plain ``apsw.Connection(path)`` (which is how the store opens
its database) goes through it without any change to the library. It can
make, on command:

- writes fail with ``SQLITE_IOERR_WRITE`` (:meth:`FaultVFS.fail_writes`),
- fsync fail with ``SQLITE_IOERR_FSYNC`` (:meth:`FaultVFS.fail_syncs`),
- writes fail with ``SQLITE_FULL``, the disk being full
  (:meth:`FaultVFS.disk_full`),

for every file, or only the main database file (``target="main"``) or only
its write-ahead log (``target="wal"``); for the next ``count`` calls, or
until :meth:`FaultVFS.clear`. A write fault may be *torn*: the first half of
the data reaches the file before the error, as when a disk fills up
mid-write. Only files under ``under`` (a directory) are affected, so a test
cannot disturb anything else in the process.

fsync follows Linux: a failed fsync reports the error once, and the kernel
forgets it (PostgreSQL's "fsyncgate"), so an fsync fault fails only a sync
of a file written since its previous sync; a sync with nothing new to write
succeeds. The data written before a failed sync stays in the file here, so
a later open may find a transaction whose commit reported the error.

Where faults surface. SQLite ignores some I/O errors by design: a failed
checkpoint (automatic after a commit, or when the last connection closes)
leaves the pages in the WAL and is retried later. apsw, however, raises the
Python exception a VFS method raised from the API call that triggered it,
even when SQLite ignored the error code: a COMMIT whose automatic
checkpoint failed raises although the commit took effect, and
``Connection.close()`` raises when its checkpoint failed. A real disk under
the C VFS never does that. In WAL mode the main database file is written
and synced only by checkpoints (and while a new database is created), so
faults aimed at ``target="main"`` (or at every file) surface through those
apsw paths; aim at ``target="wal"`` to model what SQLite reports to the
caller of a transaction. For the same reason a failing lock on a file
opened read-only (which SQLite ignores when a read-only connection closes
last) is reported as "busy", which apsw does not raise.

It can also open the main database file read-only (:meth:`FaultVFS.read_only`),
which is what SQLite's own unix VFS does when it may not open a file for
writing.

Use it as a context manager; on exit it stops injecting and unregisters, and
the previous default VFS is the default again::

    with FaultVFS(under=str(tmp_path)) as vfs:
        vfs.fail_writes(target="wal")
        ...  # every write to a -wal file under tmp_path fails
        vfs.clear()
    assert vfs.injected["write"] >= 1

``injected`` counts the faults injected, by kind (``"write"``, ``"sync"``,
``"full"``); ``calls`` counts the operations seen, by ``(operation, target)``.
Both are safe to read from the trio thread while another thread (the
store's sync thread, a worker thread) runs SQLite: the VFS is called from
whichever thread runs SQLite.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import apsw

Target = Literal["main", "wal", "other"]
Kind = Literal["write", "sync", "full"]

_CODES: dict[Kind, int] = {
    "write": apsw.SQLITE_IOERR_WRITE,
    "sync": apsw.SQLITE_IOERR_FSYNC,
    "full": apsw.SQLITE_FULL,
}


@dataclass
class _Plan:
    kind: Kind
    target: Target | None  # None: any file
    remaining: int | None  # None: until cleared
    torn: bool


class FaultVFS(apsw.VFS):
    """The default VFS, with faults on command. See the module docstring."""

    def __init__(self, name: str = "faultvfs", *, under: str | None = None) -> None:
        self.vfs_name = name
        self.base_name = apsw.vfs_names()[0]  # the default before us
        self.under = os.path.abspath(under) + os.sep if under is not None else None
        self._lock = threading.Lock()
        self._write_plan: _Plan | None = None  # "write" or "full"
        self._sync_plan: _Plan | None = None
        self._read_only = False
        self.injected: Counter[str] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()
        self._registered = True
        super().__init__(name, base=self.base_name, makedefault=True)

    # -- commands ---------------------------------------------------------

    def fail_writes(
        self, *, target: Target | None = None, count: int | None = None, torn: bool = False
    ) -> None:
        """Make xWrite fail with SQLITE_IOERR_WRITE (replaces any write fault)."""
        self._arm_write("write", target, count, torn)

    def disk_full(
        self, *, target: Target | None = None, count: int | None = None, torn: bool = False
    ) -> None:
        """Make xWrite fail with SQLITE_FULL (replaces any write fault)."""
        self._arm_write("full", target, count, torn)

    def fail_syncs(self, *, target: Target | None = None, count: int | None = None) -> None:
        """Make xSync fail with SQLITE_IOERR_FSYNC."""
        with self._lock:
            self._sync_plan = _Plan("sync", target, _check_count(count), torn=False)

    def read_only(self, on: bool = True) -> None:
        """Open main database files read-only from now on, as SQLite's unix VFS
        does when it may not open a file for writing (a 0444 file)."""
        with self._lock:
            self._read_only = on

    def clear(self) -> None:
        """Stop injecting faults (files opened read-only stay so until closed)."""
        with self._lock:
            self._write_plan = None
            self._sync_plan = None
            self._read_only = False

    @property
    def armed(self) -> bool:
        """Whether a fault is still waiting to be injected."""
        with self._lock:
            return self._write_plan is not None or self._sync_plan is not None

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def close(self) -> None:
        """Clear, unregister, and make the previous default VFS the default again."""
        self.clear()
        if self._registered:
            self._registered = False
            self.unregister()
            apsw.set_default_vfs(self.base_name)

    def __enter__(self) -> FaultVFS:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the VFS ------------------------------------------------------------

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        if flags[0] & apsw.SQLITE_OPEN_MAIN_DB:
            target: Target = "main"
        elif flags[0] & apsw.SQLITE_OPEN_WAL:
            target = "wal"
        else:
            target = "other"
        ours = self.under is None or (
            isinstance(path, str) and os.path.abspath(path).startswith(self.under)
        )
        with self._lock:
            read_only = self._read_only
        if ours and read_only and target == "main":
            flags[0] &= ~(apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE)
            flags[0] |= apsw.SQLITE_OPEN_READONLY
        return FaultFile(self, name, flags, target if ours else None)

    def _fault(
        self, op: Literal["write", "sync"], target: Target | None, eligible: bool = True
    ) -> _Plan | None:
        """The plan to inject for this call, if any (counts the call and the fault)."""
        if target is None:  # not under our directory
            return None
        with self._lock:
            self.calls[(op, target)] += 1
            plan = self._write_plan if op == "write" else self._sync_plan
            if not eligible or plan is None or (plan.target is not None and plan.target != target):
                return None
            if plan.remaining is not None:
                plan.remaining -= 1
                if plan.remaining == 0:
                    if op == "write":
                        self._write_plan = None
                    else:
                        self._sync_plan = None
            self.injected[plan.kind] += 1
            return plan

    def _arm_write(self, kind: Kind, target: Target | None, count: int | None, torn: bool) -> None:
        with self._lock:
            self._write_plan = _Plan(kind, target, _check_count(count), torn)


class FaultFile(apsw.VFSFile):
    """A file of the base VFS whose writes and syncs may fail on command."""

    def __init__(self, vfs: FaultVFS, name: Any, flags: list[int], target: Target | None) -> None:
        self._vfs = vfs
        self._target = target
        self._unsynced = False  # written since the last sync (attempt)
        super().__init__(vfs.base_name, name, flags)
        self._read_only = bool(flags[1] & apsw.SQLITE_OPEN_READONLY)

    def xLock(self, level: int) -> None:
        try:
            super().xLock(level)
        except apsw.IOError:
            if not self._read_only:
                raise
            # A read-only connection that closes last tries to take the write
            # lock to checkpoint; on a read-only descriptor that fails, and
            # SQLite ignores it. apsw would raise it from close() (see the
            # module docstring) unless it is "busy", which apsw lets pass.
            raise apsw.BusyError("faultvfs: no write lock on a read-only file") from None

    def xWrite(self, data: Any, offset: int) -> None:
        plan = self._vfs._fault("write", self._target)
        if plan is not None:
            if plan.torn and len(data) > 1:
                self._unsynced = True
                super().xWrite(bytes(memoryview(data)[: len(data) // 2]), offset)
            raise _error(plan, self._target, f"{len(data)} bytes at offset {offset}")
        self._unsynced = True
        super().xWrite(data, offset)

    def xSync(self, flags: int) -> None:
        unsynced, self._unsynced = self._unsynced, False
        plan = self._vfs._fault("sync", self._target, eligible=unsynced)
        if plan is not None:
            raise _error(plan, self._target, "fsync")
        super().xSync(flags)


def _error(plan: _Plan, target: Target | None, what: str) -> Exception:
    exc = apsw.exception_for(_CODES[plan.kind])
    exc.args = (f"faultvfs: injected {plan.kind} fault on the {target} file ({what})",)
    return exc


def _check_count(count: int | None) -> int | None:
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 or None (until cleared), got {count!r}")
    return count
