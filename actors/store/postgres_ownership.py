"""What this process owns: buckets at epochs, as the lease keeper last saw them.

Shared by the trio thread (the keeper changes it, the supervisor asks
:meth:`Ownership.owns`) and the committer's thread (the fence reads it, and
asks for a round when it finds a bucket lost). Each field is replaced whole or changed by
one dict/set operation, which CPython makes atomic: a reader sees the old
or the new, never half; the fence in the database decides anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from .buckets import bucket_of


@attrs.frozen
class OwnershipStatistics:
    """Buckets this process holds, and changes of owner it saw."""

    member: str
    buckets: int  # in the database
    owned: int
    leaving: int  # being handed over (no new handler starts there)
    gained: int  # buckets taken since start
    released: int  # buckets given back cleanly
    lost: int  # buckets found taken by another process (fenced)
    fenced_writes: int  # operations refused by the fence
    rounds: int = 0  # lease rounds done (renewals)
    failed_rounds: int = 0  # rounds whose renewal failed
    notices: int = 0  # NOTIFYs the listener received
    looks: int = 0  # reads of buckets for work (after notices, takeovers)


class Ownership:
    """The buckets this process holds, by epoch (see the module on threads)."""

    def __init__(self, member: str, buckets: int) -> None:
        self.member = member
        self.buckets = buckets
        # {bucket: epoch}: what the database said at the last renewal or
        # acquisition. Invariant: a write for a session commits only if its
        # bucket is here *and* the database still has this process as the
        # owner at this epoch (checked in the writing transaction).
        self.owned: dict[int, int] = {}
        # Buckets being handed over: held, but no handler may start there
        # (claims refused), so that their actors finish and leave.
        self.leaving: set[int] = set()
        # Asks the keeper for a round now (set by the keeper; any thread): its
        # renewal is what decides which buckets are lost.
        self.want_round: Callable[[], None] = lambda: None
        # time.monotonic() until which the leases surely hold, less a
        # quarter of their time to live (set by each renewal); a clock that
        # ran on while the process was frozen shows it at once.
        self.valid_until = 0.0
        # A start was refused on a stale lease: the keeper looks again at
        # every bucket once it renewed (sessions whose actors left for it).
        self.stale_seen = False
        self.gained = 0
        self.released = 0
        self.lost = 0
        self.fenced_writes = 0

    def bucket(self, session_id: str) -> int:
        return bucket_of(session_id, self.buckets)

    def owns(self, session_id: str) -> bool:
        """Whether this process runs ``session_id``'s handlers now."""
        b = bucket_of(session_id, self.buckets)
        return b in self.owned and b not in self.leaving

    def may_start(self) -> bool:
        """Whether the leases are fresh enough to start a handler (see valid_until)."""
        if time.monotonic() < self.valid_until:
            return True
        if not self.stale_seen:
            self.stale_seen = True
            self.want_round()
        return False

    def fenced(self) -> None:
        """A fence found a bucket held by another owner (the committer's thread,
        the only one that counts fenced_writes)."""
        self.fenced_writes += 1
        self.want_round()

    def statistics(self) -> OwnershipStatistics:
        return OwnershipStatistics(
            member=self.member,
            buckets=self.buckets,
            owned=len(self.owned),
            leaving=len(self.leaving),
            gained=self.gained,
            released=self.released,
            lost=self.lost,
            fenced_writes=self.fenced_writes,
        )
