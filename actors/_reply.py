"""What ``System.ask`` waits for: the outcome of one message's handler."""

from __future__ import annotations

from typing import Any

import trio


class Reply:
    """Set once, by the actor that ran the message (or by a dead-lettering).

    Only the first outcome counts: a redelivery after the asker was
    answered changes nothing.
    """

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set_result(self, value: Any) -> None:
        if not self.done.is_set():
            self.value = value
            self.done.set()

    def set_error(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()
