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

Reads, locks and shared memory (what a transaction meets at its ``BEGIN``):

- reads fail (:meth:`FaultVFS.fail_reads`) with ``SQLITE_IOERR_READ``
  (``kind="read"``), ``SQLITE_NOMEM`` (``"nomem"``, out of memory) or
  ``SQLITE_CORRUPT`` (``"corrupt"``); or succeed with every byte of page 1
  inverted (``"garble"``: a database header that a bad sector or a stray
  writer destroyed, which SQLite finds out by itself: "not a database").
  Only page 1, read from the database file or from the WAL: other garbled
  pages may go unnoticed, be written back by a transaction or a checkpoint,
  and corrupt the file for good, which a test could not tell from a bug;
- locks fail with ``SQLITE_IOERR_LOCK`` (:meth:`FaultVFS.fail_locks`);
- mapping the WAL index (the ``-shm`` file) into memory fails
  (:meth:`FaultVFS.fail_shm_maps`): the unix VFS's ``mmap`` system call is
  replaced (``xSetSystemCall``), so SQLite's own ``xShmMap`` reports
  ``SQLITE_IOERR_SHMMAP``. apsw does not let Python see the shared-memory
  methods themselves, and a failing shared-memory *lock* is reported by
  SQLite as "busy", which is the ordinary contention path.

When they surface. A connection in WAL mode keeps its lock on the database
file and its map of the WAL index from one transaction to the next, and
keeps its page cache while nobody else writes: a ``BEGIN IMMEDIATE`` of a
warm connection touches no file at all. It reads (page 1, from the WAL or
the database file) once another connection has committed, and maps more of
the WAL index once another *process* has grown the WAL past the first
region of the index (4062 frames; within one process the map is shared).
So a test makes another connection write, arms the fault, then lets the
store run a transaction.

Use it as a context manager; on exit it stops injecting and unregisters, and
the previous default VFS is the default again::

    with FaultVFS(under=str(tmp_path)) as vfs:
        vfs.fail_writes(target="wal")
        ...  # every write to a -wal file under tmp_path fails
        vfs.clear()
    assert vfs.injected["write"] >= 1

``injected`` counts the faults injected, by kind (``"write"``, ``"sync"``,
``"full"``, ``"read"``, ``"nomem"``, ``"corrupt"``, ``"garble"``, ``"lock"``,
``"shmmap"``); ``calls`` counts the operations seen, by ``(operation, target)``.
Both are safe to read from the trio thread while another thread (the
store's sync thread, a worker thread) runs SQLite: the VFS is called from
whichever thread runs SQLite.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import apsw

Target = Literal["main", "wal", "other"]
Kind = Literal["write", "sync", "full", "read", "nomem", "corrupt", "garble", "lock", "shmmap"]
ReadKind = Literal["read", "nomem", "corrupt", "garble"]

_CODES: dict[str, int] = {
    "write": apsw.SQLITE_IOERR_WRITE,
    "sync": apsw.SQLITE_IOERR_FSYNC,
    "full": apsw.SQLITE_FULL,
    "read": apsw.SQLITE_IOERR_READ,
    "nomem": apsw.SQLITE_NOMEM,
    "corrupt": apsw.SQLITE_CORRUPT,
    "lock": apsw.SQLITE_IOERR_LOCK,
}

# void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
_MMAP = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
    use_errno=True,
)
_MAP_FAILED = ctypes.c_void_p(-1).value
_WAL_HEADER, _WAL_FRAME_HEADER = 32, 24  # bytes


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
        self._read_plan: _Plan | None = None  # "read", "nomem", "corrupt" or "garble"
        self._lock_plan: _Plan | None = None
        self._shm_plan: _Plan | None = None  # target unused: -shm files only
        self._mmap: Any = None  # the system call replaced, and its replacement
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

    def fail_reads(
        self, *, kind: ReadKind = "read", target: Target | None = None, count: int | None = None
    ) -> None:
        """Make xRead fail with an I/O error, out of memory or corruption, or
        return inverted bytes (``kind="garble"``)."""
        if kind not in ("read", "nomem", "corrupt", "garble"):
            raise ValueError(f"unknown read fault {kind!r}")
        with self._lock:
            self._read_plan = _Plan(kind, target, _check_count(count), torn=False)

    def fail_locks(self, *, target: Target | None = None, count: int | None = None) -> None:
        """Make xLock fail with SQLITE_IOERR_LOCK."""
        with self._lock:
            self._lock_plan = _Plan("lock", target, _check_count(count), torn=False)

    def fail_shm_maps(self, *, count: int | None = None) -> None:
        """Make mapping a ``-shm`` file under ``under`` fail (SQLite: SQLITE_IOERR_SHMMAP).

        Replaces the unix VFS's ``mmap`` system call, for the whole process,
        until :meth:`close`; other files are mapped as before.
        """
        with self._lock:
            self._shm_plan = _Plan("shmmap", None, _check_count(count), torn=False)
            if self._mmap is None:
                pointer = self.xGetSystemCall("mmap")
                if pointer is None:
                    raise RuntimeError(f"the {self.base_name} VFS has no mmap system call")
                fake = _MMAP(self._fake_mmap)
                self._mmap = (pointer, _MMAP(pointer), fake)  # (kept alive while set)
                self.xSetSystemCall("mmap", _address(fake))

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
            self._read_plan = None
            self._lock_plan = None
            self._shm_plan = None
            self._read_only = False

    @property
    def armed(self) -> bool:
        """Whether a fault is still waiting to be injected."""
        with self._lock:
            return any(
                plan is not None
                for plan in (
                    self._write_plan,
                    self._sync_plan,
                    self._read_plan,
                    self._lock_plan,
                    self._shm_plan,
                )
            )

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def close(self) -> None:
        """Clear, unregister, and make the previous default VFS the default again."""
        self.clear()
        if self._mmap is not None:
            pointer, _, _ = self._mmap
            self.xSetSystemCall("mmap", pointer)
            self._mmap = None
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
        self,
        op: Literal["write", "sync", "read", "lock", "shm"],
        target: Target | None,
        eligible: bool = True,
    ) -> _Plan | None:
        """The plan to inject for this call, if any (counts the call and the fault)."""
        if target is None:  # not under our directory
            return None
        attr = f"_{op}_plan"
        with self._lock:
            self.calls[(op, target)] += 1
            plan: _Plan | None = getattr(self, attr)
            if not eligible or plan is None or (plan.target is not None and plan.target != target):
                return None
            if plan.remaining is not None:
                plan.remaining -= 1
                if plan.remaining == 0:
                    setattr(self, attr, None)
            self.injected[plan.kind] += 1
            return plan

    def _read_eligible(self, file: FaultFile, offset: int) -> bool:
        # A garbling fault inverts page 1 only: SQLite finds it at once ("not a
        # database"), and no garbled page can be written back by a transaction
        # or a checkpoint (which a test could not tell from a store's bug).
        with self._lock:
            plan = self._read_plan
        if plan is None or plan.kind != "garble":
            return True
        return file.is_page_one(offset)

    def _fake_mmap(
        self, addr: int | None, length: int, prot: int, flags: int, fd: int, off: int
    ) -> int | None:
        # Called by SQLite (any thread, the GIL taken by ctypes) for every
        # mmap of the unix VFS; only -shm files under our directory fail.
        try:
            path = os.readlink(f"/proc/self/fd/{fd}") if fd >= 0 else ""
        except OSError:
            path = ""
        ours = path.endswith("-shm") and (self.under is None or path.startswith(self.under))
        if ours and self._fault("shm", "other") is not None:
            ctypes.set_errno(errno.ENOMEM)
            return _MAP_FAILED
        _, real, _ = self._mmap
        result: int | None = real(addr, length, prot, flags, fd, off)
        return result

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

    def _lock_base(self, level: int) -> None:
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

    def xLock(self, level: int) -> None:
        if self._vfs._fault("lock", self._target) is not None:
            raise _error("lock", self._target, f"lock level {level}")
        self._lock_base(level)

    def xRead(self, amount: int, offset: int) -> bytes:
        plan = self._vfs._fault(
            "read", self._target, eligible=self._vfs._read_eligible(self, offset)
        )
        data: bytes
        if plan is None:
            data = super().xRead(amount, offset)
            return data
        if plan.kind == "garble":
            data = super().xRead(amount, offset)
            return bytes(b ^ 0xFF for b in data)
        raise _error(plan.kind, self._target, f"{amount} bytes at offset {offset}")

    def is_page_one(self, offset: int) -> bool:
        """Whether a read at ``offset`` reads page 1 (the database header)."""
        if self._target == "main":
            return offset == 0
        if self._target == "wal" and offset >= _WAL_FRAME_HEADER + _WAL_HEADER:
            # A frame's data follows its header, whose first 4 bytes are its page number.
            header: bytes = super().xRead(4, offset - _WAL_FRAME_HEADER)
            return int.from_bytes(header, "big") == 1
        return False

    def xWrite(self, data: Any, offset: int) -> None:
        plan = self._vfs._fault("write", self._target)
        if plan is not None:
            if plan.torn and len(data) > 1:
                self._unsynced = True
                super().xWrite(bytes(memoryview(data)[: len(data) // 2]), offset)
            raise _error(plan.kind, self._target, f"{len(data)} bytes at offset {offset}")
        self._unsynced = True
        super().xWrite(data, offset)

    def xSync(self, flags: int) -> None:
        unsynced, self._unsynced = self._unsynced, False
        plan = self._vfs._fault("sync", self._target, eligible=unsynced)
        if plan is not None:
            raise _error(plan.kind, self._target, "fsync")
        super().xSync(flags)


def _error(kind: str, target: Target | None, what: str) -> Exception:
    exc = apsw.exception_for(_CODES[kind])
    exc.args = (f"faultvfs: injected {kind} fault on the {target} file ({what})",)
    return exc


def _address(fn: Any) -> int:
    address = ctypes.cast(fn, ctypes.c_void_p).value
    assert address is not None
    return address


def _check_count(count: int | None) -> int | None:
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 or None (until cleared), got {count!r}")
    return count
