"""What an incarnation of a session's actor carries for its handler: state, outbox, message.

A :class:`SessionData` is owned by the session actor (it loads the state,
begins and ends each message, and takes the ack), and read and written by
the handler through its :class:`~actors.Context`, the user-facing view of
it. Keeping the two apart lets the actor sit below the public API: it
never needs the ``System`` that a context also carries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._codec import check_encoded, decode_body, encode_json
from ._records import Message
from ._streams import Outputs
from .store import Ack, BatchAck

# One queued ctx.send: (session id, encoded body, epoch time of the send).
Outgoing = tuple[str, str | bytes, float]


class SessionData:
    """One incarnation's session state, outbox and current message.

    Attributes (the actor's and the context's, nobody else's):
      state: the decoded state, None until loaded (``load``).
      state_json: the state as last committed (or about to be, with the
        pending ack): an ack writes the state only if its text differs.
      state_used: the handler may have changed ``state`` since the last
        ack (it read or assigned it): the ack compares it.
      outbox: the messages ``ctx.send`` queued for this message's ack.
      message: the message being handled (None outside ``handle``); a
        batch's last message while a batched handler runs.
    """

    __slots__ = (
        "_max_value_bytes",
        "_now",
        "_outputs",
        "message",
        "outbox",
        "session_id",
        "state",
        "state_json",
        "state_used",
    )

    def __init__(
        self,
        session_id: str,
        now: Callable[[], float],
        outputs: Outputs,
        max_value_bytes: int,
    ) -> None:
        self.session_id = session_id
        self._now = now  # epoch seconds (the system's clock: MockClock moves it)
        self._outputs = outputs
        self._max_value_bytes = max_value_bytes
        self.state: dict[str, Any] | None = None
        self.state_json = "{}"
        self.state_used = False
        self.outbox: list[Outgoing] | None = None
        self.message: Message | None = None

    def load(self, text: str | None) -> None:
        """Take the committed state (``None``: the session has none yet)."""
        if text is None:
            self.state, self.state_json = {}, "{}"
            return
        value = decode_body(text)
        if not isinstance(value, dict):
            raise ValueError(f"stored state of session {self.session_id!r} is not an object")
        self.state, self.state_json = value, text

    def queue(self, session_id: str, data: str | bytes) -> None:
        """Queue a message (validated and encoded) to commit with this message's ack."""
        if self.outbox is None:
            self.outbox = []
        self.outbox.append((session_id, data, self._now()))

    async def publish(self, value: Any) -> None:
        """Stream ``value`` to the session's subscribers (with their backpressure)."""
        await self._outputs.publish(self.session_id, value)

    def ack(self, msg: Message) -> int | Ack:
        """What the ack of ``msg`` must write: its id alone, or an :class:`Ack`.

        Raises TypeError if the handler left ``state`` not JSON-compatible,
        ValueError if its text is too large for the database: the attempt
        fails, and the state is rolled back.
        """
        state_json: str | None = None
        if self.state_used:
            try:
                text = encode_json(self.state)
            except (TypeError, ValueError, RecursionError) as exc:
                raise TypeError(f"ctx.state is not JSON-compatible: {exc}") from None
            if text != self.state_json:
                # Checked only when it is written: a text equal to the
                # committed one passed this check when it was written.
                check_encoded(self.state, text, "ctx.state is not JSON-compatible: it")
                limit = self._max_value_bytes
                if len(text) > limit >> 2:  # (UTF-8 takes at most 4 bytes a character)
                    _check_state_size(text, limit)
                state_json = self.state_json = text
        outbox, self.outbox = self.outbox, None
        if state_json is None and outbox is None and msg.key is None:
            return msg.id
        return Ack(msg.id, self.session_id, state_json, outbox, msg.key, self._now())

    def ack_batch(self, msgs: list[Message]) -> BatchAck:
        """What the ack of a batch (``msgs``, two or more) writes: as ``ack`` of
        its last message, deleting the others (and marking their keys) too.

        Raises as ``ack``.
        """
        last = msgs[-1]
        done = self.ack(last)
        if type(done) is int:
            return BatchAck(msgs[:-1], done, self.session_id, None, None, None, self._now())
        assert isinstance(done, Ack)
        return BatchAck(
            msgs[:-1], done.id, self.session_id, done.state, done.outbox, done.key, done.at
        )


def _check_state_size(text: str, limit: int) -> None:
    """Refuse a state the database cannot store (the attempt fails, the system goes on)."""
    size = len(text) if text.isascii() else len(text.encode("utf-8"))
    if size > limit:
        raise ValueError(
            f"ctx.state is {size} bytes encoded; the database stores at most {limit} "
            "(SQLite's SQLITE_LIMIT_LENGTH, less room for the rest of the row)"
        )
