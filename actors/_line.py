"""The line of sessions waiting for an actor slot, fair across sessions.

Sessions waiting for a slot form one line, first come first served: a
session that yields its slot goes to the back, behind every session that
waited before it yielded, so a slot comes to a waiting session after about
(sessions ahead of it + 1) x ``fair_share`` messages of others, however old
their backlogs. The front of the line is held in memory, up to a bound;
past it, and after a restart, waiting sessions are found in the database
instead ("overflow"), oldest head first (a session that has not run since
it got work began waiting when its head was sent), so memory grows with
active actors, not with pending work. Sessions that yield while the line
overflows wait in memory behind the overflow (``behind``), up to a bound
too; beyond both bounds the order falls back to the age of the heads.

The supervisor owns the line and the slots; this class only keeps the order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Set

import attrs

WAITING_LIMIT = 10_000  # sessions queued in memory; the rest are found in the database
BEHIND_LIMIT = 10_000  # sessions that yielded while the line overflowed, kept in memory


@attrs.frozen
class LineStatistics:
    """The waiting line right now."""

    waiting: int  # sessions queued in memory (in front, and behind the overflow)
    overflow: bool  # more wait in the database


class WaitingLine:
    """Sessions with work and no actor, in the order they get a slot."""

    def __init__(self, *, overflow: bool) -> None:
        # Sessions in arrival order. _front_set mirrors _front; neither holds
        # a live session (the supervisor takes a session out as it starts).
        self._front: deque[str] = deque()
        self._front_set: set[str] = set()
        # True when sessions with work may exist that are neither live nor
        # in memory: they are found in the database, oldest head first.
        # _overflow_gen counts the times it was set, so a refill clears it
        # only if nothing set it again while the refill read.
        self.overflow = overflow
        self._overflow_gen = 0
        # Sessions that yielded their slot while the line overflowed, in
        # yield order, with the store's next seq at that moment: they wait
        # behind every session of the database whose head is older (it
        # waited before they yielded), so a refill merges the two lines by
        # that order. Non-empty only while overflow holds; _behind_set
        # mirrors it, and neither holds a session of _front.
        self._behind: deque[tuple[int, str]] = deque()
        self._behind_set: set[str] = set()

    def statistics(self) -> LineStatistics:
        """A snapshot of the line."""
        return LineStatistics(waiting=len(self), overflow=self.overflow)

    def __len__(self) -> int:
        """Sessions waiting in memory."""
        return len(self._front) + len(self._behind)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._front_set or session_id in self._behind_set

    @property
    def has_waiters(self) -> bool:
        """Whether some session with work waits for a slot."""
        return bool(self._front) or self.overflow

    @property
    def front_empty(self) -> bool:
        """Nothing waits in memory in front of the overflow."""
        return not self._front

    @property
    def behind(self) -> Set[str]:
        """The sessions waiting behind the overflow (a refill must not find them again)."""
        return self._behind_set

    def clear(self) -> None:
        """Forget every waiting session (the system stops: their work stays in the database)."""
        self._front.clear()
        self._front_set.clear()
        self._behind.clear()
        self._behind_set.clear()

    def add(self, session_id: str, *, yielded: bool, next_seq: int) -> bool:
        """Put ``session_id`` at the back of the line; True if it went to the overflow.

        ``yielded``: it just left a slot after its fair share. Its head is
        old, so the database's age order would put it first again: it is
        kept in memory, at the back. ``next_seq`` is the store's next seq
        (when it began to wait, should it wait behind the overflow).
        """
        if yielded and not self.overflow:
            self._append(session_id)
        elif yielded and len(self._behind) < BEHIND_LIMIT:
            self._behind.append((next_seq, session_id))
            self._behind_set.add(session_id)
        elif self.overflow or len(self._front) >= WAITING_LIMIT:
            self.set_overflow()  # it is in the database; a refill finds it in age order
            return True
        else:
            self._append(session_id)
        return False

    def set_overflow(self) -> None:
        """Sessions with work may be in the database only."""
        self.overflow = True
        self._overflow_gen += 1

    def pop(self) -> str | None:
        """The session at the front, taken off the line (None if none waits in memory)."""
        if not self._front:
            return None
        session_id = self._front.popleft()
        self._front_set.discard(session_id)
        return session_id

    def generation(self) -> int:
        """What a refill reads before it asks the database (see ``refilled``)."""
        return self._overflow_gen

    def refilled(
        self, found: Iterable[tuple[str, int]], complete: bool, generation: int, live: Set[str]
    ) -> None:
        """Line up the sessions a refill found in the database (oldest head first).

        ``complete``: the refill found every waiting session there is, so the
        overflow ends unless something set it again since ``generation``.
        The sessions found are merged with those that yielded meanwhile, by
        when each began to wait. While more remain in the database, a
        yielded one comes only before the last head found: the rest may be
        older. ``live`` sessions have an actor and are skipped.
        """
        if complete and generation == self._overflow_gen:
            self.overflow = False
        behind = self._behind
        for session_id, head in found:
            while behind and behind[0][0] <= head:
                self._line_up(behind.popleft()[1], live)
            self._line_up(session_id, live)
        if not self.overflow:
            while behind:
                self._line_up(behind.popleft()[1], live)

    def _line_up(self, session_id: str, live: Set[str]) -> None:
        self._behind_set.discard(session_id)
        if session_id not in live and session_id not in self._front_set:
            self._append(session_id)

    def _append(self, session_id: str) -> None:
        self._front.append(session_id)
        self._front_set.add(session_id)
