"""Sends on PostgreSQL: a committer and a connection of their own, one statement a group.

A send needs no fence (an insert is not a write for a bucket's owner: any
process may send to any session), so sends do not wait behind the main
committer's groups of claims and acks, whose transactions are several round
trips each. Each group of sends is one statement on an autocommit
connection, its own transaction: the insert of every message of the group
and, in the same statement, the notice to the owners of their buckets. One
round trip, where a transaction (BEGIN, INSERT, NOTIFY, COMMIT) was four:
under load each round trip also waits for the GIL when it comes back (see
docs/performance.md), which is what a send's latency is made of.

Keyed sends read and record their keys first: their group is an explicit
transaction (BEGIN ... COMMIT), the statement last in it.

No message is inserted claimed here (a claim on delivery would need the
fence): the owner claims. Whether to announce a bucket is decided in the
statement from this process's ownership; a bucket dropped while a send was
on its way is announced again once the sends submitted before have
committed (``PgCluster._tell_owners``).
"""

from __future__ import annotations

from typing import Any

from .postgres_ops import INSERT_MESSAGES, INSERT_MESSAGES_AGAIN, NOTIFY_CHANNEL, Operations

# The insert, and the notice in the same statement (and so the same
# transaction: sent at its commit).
_INSERT_NOTIFY = {
    insert: f"WITH inserted AS ({insert}) SELECT pg_notify(%s, %s)"
    for insert in (INSERT_MESSAGES, INSERT_MESSAGES_AGAIN)
}


class SendOperations(Operations):
    """Operations whose appends are staged and run as one statement at ``finish``.

    Only ``append`` (and ``nothing``) run on it.
    """

    def begin(self) -> None:
        super().begin()
        self._staged: list[tuple[list[Any], ...]] = []
        self._in_transaction = False

    def _insert(self, columns: tuple[list[Any], ...]) -> None:
        self._staged.append(columns)

    def _narrow_claimed(self, sessions: Any, buckets: Any, claimed: set[int]) -> None:
        claimed.clear()  # (no claim on delivery here: see the module)

    def _keys_read(self) -> None:
        if not self._in_transaction:
            self.conn.execute("BEGIN")  # (the connection is in autocommit)
            self._in_transaction = True

    def finish(self) -> None:
        staged = self._staged
        if not staged:
            return
        columns = staged[0]
        if len(staged) > 1:
            columns = tuple([v for group in staged for v in group[c]] for c in range(len(columns)))
        others = self.elsewhere()
        insert = INSERT_MESSAGES_AGAIN if self.again else INSERT_MESSAGES
        if others:
            self.conn.execute(
                _INSERT_NOTIFY[insert], (*columns, NOTIFY_CHANNEL, self.notice(others))
            )
        else:
            self.conn.execute(insert, columns)
