"""Which handlers had started when the process died: a memory-mapped sidecar.

The database knows which messages were claimed (in flight) when a process
died, but not which of them had a handler running: a message can be claimed
at insert and wait in its actor's queue behind the one being handled (claim
on delivery). Charging every claimed message an attempt would blame
bystanders, and committing a "started" mark per message would cost a
transaction round trip before every handler.

So each live actor owns a slot in ``<database>.starts``, a small file mapped
into memory, and writes the id of the message whose handler it is about to
run into it: one store to shared memory, no system call. The kernel keeps a
shared file mapping's pages when the process dies, however it dies, so the
next start reads the slots and knows, per session, the last message whose
handler started. Messages of a session are handled in order, so every
claimed message of that session at or before it had started (and is charged
its attempt); every claimed message after it had not (and gets its attempt
back). See ``sqlite_schema.recover``.

The file begins with the identity (device and inode) of the database file
it belongs to: a table left beside another database (a restored backup, a
replaced file) does not match and is ignored, and the database then charges
every claimed message, as if all had started. Marks of an earlier run of the
same database are harmless: recovery only looks at messages in flight, and
every start recovers them all and then begins a fresh table. A power loss
may lose the marks (they are not synced): the messages are then redelivered
with their attempt given back, which only errs towards the handler.

Layout: magic (8 bytes), device (8), inode (8), then one little-endian int64
per slot (0 = empty). The file grows by doubling when every slot is taken.
"""

from __future__ import annotations

import mmap
import os
import struct

import attrs

MAGIC = b"actstrt1"
_HEADER = struct.Struct("<8sQQ")
_SLOT = 8
_FIRST_CAPACITY = 64


@attrs.frozen
class StartTableStatistics:
    """The slots right now."""

    capacity: int  # slots in the file
    in_use: int  # slots owned by live actors
    marks: int  # handler starts written since the table opened


def starts_file(db_path: str) -> str:
    """The start table of the database at ``db_path``, by its resolved path
    (as the lock's sidecar): every name of the file reaches the same one."""
    return os.path.realpath(db_path) + ".starts"


def database_identity(db_path: str) -> tuple[int, int]:
    """(device, inode) of the database file."""
    st = os.stat(db_path)
    return st.st_dev, st.st_ino


def read_marks(path: str, identity: tuple[int, int]) -> list[int] | None:
    """The marks of the start table at ``path``; None if absent, not one, or another database's."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _HEADER.size:
        return None
    magic, device, inode = _HEADER.unpack_from(data)
    if magic != MAGIC or (device, inode) != identity:
        return None
    count = (len(data) - _HEADER.size) // _SLOT
    values = struct.unpack_from(f"<{count}q", data, _HEADER.size)
    return [v for v in values if v > 0]


class StartTable:
    """The live slots; every method runs on the trio thread.

    Invariant: a slot belongs to at most one live actor (``acquire`` to
    ``release``), and holds the id of the last message whose handler that
    actor started, or 0.
    """

    def __init__(self, path: str, identity: tuple[int, int]) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._capacity = 0
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._free: list[int] = []
        self._in_use = 0
        self.marks = 0
        self._grow(_FIRST_CAPACITY)
        assert self._map is not None
        _HEADER.pack_into(self._map, 0, MAGIC, *identity)

    def _grow(self, capacity: int) -> None:
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            self._map.close()
        os.ftruncate(self._fd, _HEADER.size + capacity * _SLOT)
        self._map = mmap.mmap(self._fd, _HEADER.size + capacity * _SLOT)
        self._view = memoryview(self._map)[_HEADER.size :].cast("q")
        # Hand out low slots first (pop() takes from the end).
        self._free.extend(range(capacity - 1, self._capacity - 1, -1))
        self._free.sort(reverse=True)
        self._capacity = capacity

    def acquire(self) -> int:
        """A free slot for a new actor (growing the file if every slot is taken)."""
        if not self._free:
            self._grow(self._capacity * 2)
        self._in_use += 1
        return self._free.pop()

    def mark(self, slot: int, message_id: int) -> None:
        """The handler of ``message_id`` is about to start (survives a crash)."""
        view = self._view
        assert view is not None
        view[slot] = message_id
        self.marks += 1

    def release(self, slot: int) -> None:
        """The slot's actor left and every ack it submitted has committed."""
        view = self._view
        if view is None:
            return  # closed
        view[slot] = 0
        self._free.append(slot)
        self._in_use -= 1

    def statistics(self) -> StartTableStatistics:
        """Capacity, slots in use and marks written."""
        return StartTableStatistics(capacity=self._capacity, in_use=self._in_use, marks=self.marks)

    def close(self) -> None:
        """Unmap and close (a clean stop leaves nothing in flight to recover)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)
