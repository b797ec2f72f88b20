"""One running system per database file, whatever name the file is reached by.

A database file has many names: a relative path, ``./x/../app.db``, a
symbolic link, a hard link. A lock keyed on the name as written let a second
system in through another name; it then "recovered" the first system's
in-flight messages and ran them a second time. So the lock is taken on the
file itself, in three parts, each covering what the others cannot:

- **In this process**, a registry keyed on the file's (device, inode): a
  second system on any name of a file held here is refused at once, before
  anything is opened.
- **The sidecar** ``<real path>.lock``, named from the resolved path
  (``os.path.realpath``: symbolic links and ``..`` resolved), held with
  ``flock``: every name that resolves to the same path meets there, so the
  usual refusal needs no descriptor of the database. It carries the owner's
  description (process, host, start time) for the error message, and it
  excludes systems of earlier versions, which lock only it.
- **Across processes**, an open file description lock (``F_OFD_SETLK``, Linux)
  on one byte of the database file itself, past the bytes SQLite locks: it
  belongs to the file, not to a name, so every name conflicts, hard links
  included (whose resolved paths differ), and the kernel drops it when the
  process dies, however it dies.

Why the database is opened last, and closed late: closing *any* descriptor
of a file drops every POSIX lock the process holds on it, and SQLite's locks
are POSIX locks (a connection in WAL mode holds a shared one as long as it
is open). So nothing here opens and closes the database behind SQLite's
back while a connection of the same process may be open: the registry
answers for this process's systems, the sidecar refuses most attempts
before the database is opened, the descriptor that carries the byte lock is
opened before the store and closed only after the store has closed its
connections, and one that a refused attempt opened is kept until
:meth:`DatabaseLock.release`, which the caller calls once its own
connections are closed. (A connection of your own to the database, in a
process where a system stops, loses its locks; with no other process on
the file that is harmless.)

SQLite keeps a database's ``-wal`` and ``-shm`` files beside the *name* it
was opened by, and so does this runtime its ``.starts`` table: a database
with hard links must always be opened by the same one of them. A start logs
a warning when the file has more than one link.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
import struct
import threading

import attrs

from ._errors import DatabaseInUseError

log = logging.getLogger("actors")

# The byte of the database file that the cross-process lock covers: past
# SQLite's lock bytes (0x40000000 to 0x400001FF, the "pending byte" region
# of os_unix.c), so that it never conflicts with SQLite's own locks, and
# below 2**31, which every NFS lock protocol can express.
LOCK_BYTE = 0x4000_0400

_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (off_t is 64-bit in
# CPython's builds); padded to the kernel's size, which includes alignment.
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = 32
# What fcntl says on a file system that has no byte-range locks.
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS}

# Files whose lock a DatabaseLock of this process holds: (device, inode) ->
# the holder's description. Guarded by _HELD_LOCK (systems may start in
# several threads, each with its own trio run). Invariant: an entry exists
# exactly while a DatabaseLock holds that file (from a successful acquire to
# its release).
_HELD: dict[tuple[int, int], str] = {}
_HELD_LOCK = threading.Lock()


def real_path(db_path: str) -> str:
    """The database's resolved path: the one name its side files are kept by."""
    return os.path.realpath(db_path)


def lock_file(db_path: str) -> str:
    """The sidecar lock file of the database at ``db_path`` (any of its names)."""
    return real_path(db_path) + ".lock"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _flock_struct(kind: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, LOCK_BYTE, 1, 0).ljust(_FLOCK_SIZE, b"\0")


def _lock_byte(fd: int, kind: int) -> bool:
    """Take the database's byte lock on ``fd``; False if another description holds it."""
    if _OFD_SETLK is None:
        return True  # no OFD locks here (not Linux): the sidecar alone guards
    try:
        fcntl.fcntl(fd, _OFD_SETLK, _flock_struct(kind))
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
        return False
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        # A file system without byte-range locks (some FUSE ones): the
        # sidecar still guards every name of the file but its hard links.
        log.debug("no byte-range locks here (%s): the sidecar lock alone guards", exc)
    return True


def _byte_locked(fd: int) -> bool:
    """Whether another open file description holds the database's byte lock."""
    if _OFD_GETLK is None:
        return False
    try:
        answer = fcntl.fcntl(fd, _OFD_GETLK, _flock_struct(fcntl.F_WRLCK))
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        return False
    return bool(_FLOCK.unpack_from(answer)[0] != fcntl.F_UNLCK)


def _sidecar_owner(path: str) -> str | None:
    """What the holder of the sidecar lock wrote there; None if nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not os.pread(fd, 1, 0):
            # Released cleanly (DatabaseLock empties it when it lets go, and
            # writes its owner right after taking it): nothing to try, and
            # no shared lock that a system starting this instant would meet.
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "owner unknown"
        return None  # not held: what it says is stale (closing drops our lock)
    finally:
        os.close(fd)


def is_held(db_path: str) -> bool:
    """Whether a running system holds the database at ``db_path`` (by any name).

    Asks the registry of this process, then the sidecar by the resolved path
    (which every system holds, whatever name it used, unless that name is
    another hard link), and, only for a file with more than one link, the
    byte lock of the file itself (``F_OFD_GETLK``, which takes nothing). The
    byte lock is read through a descriptor of the database that is closed
    again, which drops this process's SQLite locks on it: for a hard-linked
    database, call this with no connection of your own to it open in this
    process (see the module's docstring).
    """
    try:
        st = os.stat(db_path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    with _HELD_LOCK:
        if _identity(st) in _HELD:
            return True
    if _sidecar_owner(lock_file(db_path)) is not None:
        return True
    if st.st_nlink < 2:
        return False
    try:
        fd = os.open(db_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return _identity(os.fstat(fd)) == _identity(st) and _byte_locked(fd)
    finally:
        os.close(fd)


@attrs.frozen
class DatabaseLockStatistics:
    """What :meth:`DatabaseLock.statistics` returns."""

    held: bool
    identity: tuple[int, int] | None  # (device, inode) of the file while held
    refusals: int  # acquire() calls refused because another system holds the file


class DatabaseLock:
    """Holds a database file for one running system (see the module's docstring).

    ``acquire`` creates the database file if it is missing (empty: SQLite
    takes an empty file for a new database), because the lock is the file's.
    """

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.real_path = real_path(db_path)
        self.path = self.real_path + ".lock"  # the sidecar
        self.identity: tuple[int, int] | None = None  # (device, inode) while held
        self._refusals = 0
        # The database's descriptor: it carries the byte lock while held. One
        # opened by an attempt that was refused is kept for the next attempt
        # and closed by release(): closing it would drop the SQLite locks of
        # the caller's own connections to the file (the command line polls
        # for the lock while its connection waits for the running system).
        self._db_fd: int | None = None
        self._db_kind = fcntl.F_WRLCK  # the byte lock _db_fd can take
        self._fd: int | None = None  # the sidecar's, while held

    def acquire(self) -> None:
        """Take the lock or raise DatabaseInUseError naming the owner.

        May be called again after a refusal (the command line polls so). Call
        :meth:`release` in the end either way, once the caller's own
        connections to the database are closed.

        Raises:
          DatabaseInUseError: a running system holds the file, by any name.
          OSError: the file or its sidecar cannot be opened or created.
        """
        try:
            with _HELD_LOCK:
                if self.identity is None:
                    self._acquire()
        except DatabaseInUseError:
            self._refusals += 1
            raise

    def statistics(self) -> DatabaseLockStatistics:
        return DatabaseLockStatistics(
            held=self.identity is not None, identity=self.identity, refusals=self._refusals
        )

    def _acquire(self) -> None:
        name = self.db_path  # as given: the kernel (and SQLite) read ".." after a link
        try:
            identity: tuple[int, int] | None = _identity(os.stat(name))
        except FileNotFoundError:
            identity = None
            # "missing/../app.db" names nothing (os.path.realpath makes it
            # ./app.db as text): fail before the sidecar is created.
            os.stat(os.path.dirname(name) or ".")
        if identity is not None and identity in _HELD:
            raise DatabaseInUseError(self.db_path, _HELD[identity])
        # The sidecar first: every name that resolves to this path meets
        # here, so the usual refusal opens no descriptor of the database.
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
        try:
            st, db_fd = self._open_database(name)
            if not _lock_byte(db_fd, self._db_kind):
                raise DatabaseInUseError(
                    self.db_path, "a process that opened it under another name, such as a hard link"
                )
        except BaseException:
            os.close(fd)  # (its text stays: it was not ours)
            raise
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        info = f"pid {os.getpid()} on {socket.gethostname()}, started {started}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        self.identity = _identity(st)
        _HELD[self.identity] = f"{info}, in this process, as {name!r}"
        if st.st_nlink > 1:
            log.warning(
                "database %r has %d names (hard links): SQLite keeps its WAL beside the"
                " name a database is opened by, so always open it by the same one",
                self.real_path,
                st.st_nlink,
            )

    def _open_database(self, name: str) -> tuple[os.stat_result, int]:
        """Open the database into ``_db_fd`` (or keep the one a refusal left)."""
        if self._db_fd is not None:
            st = os.fstat(self._db_fd)
            try:
                if _identity(os.stat(name)) == _identity(st):
                    return st, self._db_fd
            except FileNotFoundError:
                pass
            # Replaced since the refusal: that file is not this one any more.
            old, self._db_fd = self._db_fd, None
            os.close(old)
        try:
            db_fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            kind = fcntl.F_WRLCK
        except OSError as exc:
            if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
                raise
            # A file this process may not write: SQLite opens it read-only
            # and the store refuses it with a clear error. A read lock still
            # conflicts with the write lock of a system that runs on it.
            db_fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            kind = fcntl.F_RDLCK
        st = os.fstat(db_fd)
        if _identity(st) in _HELD:
            # The name was pointed at a file held here between the stat and
            # the open. Closing this descriptor would drop that system's
            # SQLite locks: leave it open (one descriptor, in a race that
            # takes a rename onto a running database to lose).
            raise DatabaseInUseError(self.db_path, _HELD[_identity(st)])
        self._db_fd, self._db_kind = db_fd, kind
        return st, db_fd

    def release(self) -> None:
        """Drop the lock, or what a refused attempt kept (idempotent). The files
        stay; they are harmless unlocked.

        Call it only after the store, and the caller, have closed their
        connections to the database (closing the database's descriptor drops
        this process's POSIX locks on the file, SQLite's included).
        """
        with _HELD_LOCK:
            if self.identity is not None:
                _HELD.pop(self.identity, None)
                self.identity = None
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.ftruncate(fd, 0)
                os.close(fd)
            if self._db_fd is not None:
                db_fd, self._db_fd = self._db_fd, None
                os.close(db_fd)
