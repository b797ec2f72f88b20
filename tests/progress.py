"""Wait for a child process's progress without sleeping.

The child (tests/crash_child.py, tests/soak_child.py) writes one byte to the
pipe named by ``ACTORS_TEST_PROGRESS_FD`` after every line it logs; the
parent blocks in ``select`` on the pipe's read end and looks at the log again
when it becomes readable. The child's end is non-blocking and drops bytes
when the pipe is full: a full pipe is readable, which is all the parent needs.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    import actors

ENV = "ACTORS_TEST_PROGRESS_FD"


class ProgressPipe:
    """A pipe from a child to the parent that says "I logged something"."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)

    def popen_options(self) -> dict[str, Any]:
        """Keyword arguments for subprocess.Popen that hand the child the pipe."""
        return {"pass_fds": (self._write,), "env": {**os.environ, ENV: str(self._write)}}

    def spawned(self) -> None:
        """Call after Popen: the parent keeps only the read end."""
        if self._write >= 0:
            os.close(self._write)
            self._write = -1

    def wait(
        self,
        proc: subprocess.Popen[str],
        predicate: Callable[[], bool],
        timeout: float,
        on_failure: Callable[[str], None],
    ) -> None:
        """Block until ``predicate()`` holds; ``on_failure`` if the child exits or time runs out."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._read, selectors.EVENT_READ)
            while not predicate():
                if proc.poll() is not None:
                    on_failure(f"child exited with {proc.returncode}")
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    on_failure(f"timed out after {timeout}s")
                    return
                if selector.select(timeout=remaining):
                    try:
                        if not os.read(self._read, 65536):  # EOF: the child is gone
                            proc.wait(timeout=remaining)
                    except BlockingIOError:
                        pass

    def close(self) -> None:
        self.spawned()
        if self._read >= 0:
            os.close(self._read)
            self._read = -1


def child_progress_fd() -> int | None:
    """In the child: the non-blocking write end, if the parent gave one."""
    value = os.environ.get(ENV)
    if value is None:
        return None
    fd = int(value)
    os.set_blocking(fd, False)
    return fd


def signal_progress(fd: int | None) -> None:
    """In the child: one byte of "something happened" (dropped if the pipe is full)."""
    if fd is not None:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")


class Log:
    """In the child: the log the parent reads; one ``write()`` per line.

    Each line is a single append (atomic at these sizes), then one byte of
    progress for the parent.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._progress = child_progress_fd()

    def write(self, *fields: object) -> None:
        os.write(self._fd, (" ".join(map(str, fields)) + "\n").encode())
        signal_progress(self._progress)


class Room:
    """Senders wait here while the backlog is over its limit; handler starts poke it."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def poke(self) -> None:
        self._event.set()

    async def wait(self, system: actors.System, limit: int) -> None:
        while system.statistics().pending > limit:
            if self._event.is_set():
                self._event = trio.Event()
            await self._event.wait()
