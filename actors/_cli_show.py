"""How the command line shows what it read: user data made visible, ages, lines and tables.

Session ids come from producers, error texts from handlers, hosts from the
processes of a cluster: shown raw, an escape sequence would reach the
operator's terminal and a newline would forge a line of output, so every
such text goes through :func:`visible` (and into a table as plain text,
never rich markup: :func:`cell`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from . import _admin
from ._health import Health, seconds_text


def visible(text: str) -> str:
    """``text`` safe to show on a terminal, on one line, every character visible.

    As it is if it is printable. Otherwise written as in a Python string
    literal: control characters (C0, DEL, C1: a newline, a terminal escape
    sequence's ESC), format characters (bidirectional overrides, zero-width
    ones), line separators and lone surrogates become escapes (``\\n``,
    ``\\x1b``, ``\\u202e``), and a backslash is doubled so that an escape
    is never ambiguous. Session ids come from producers and errors from
    handlers: shown raw, an escape sequence would reach the operator's
    terminal, and a newline would forge a line of output.
    """
    if text.isprintable():
        return text
    return "".join(
        "\\\\" if char == "\\" else char if char.isprintable() else repr(char)[1:-1]
        for char in text
    )


def cell(text: str) -> Text:
    """A table cell of user data: plain text (never rich markup), every character visible."""
    return Text(visible(text))


def age_text(seconds: float | None) -> str:
    """An age for a table: ``-`` for none."""
    return "-" if seconds is None else seconds_text(seconds)


def one_line(error: str, width: int = 72) -> str:
    """The last line of an error text (a traceback's exception), visible and at most ``width``."""
    # By "\n" only (a traceback's lines): a "\r" or another line break
    # inside the message is part of it, and shown escaped.
    lines = [line.strip() for line in error.split("\n") if line.strip()]
    last = visible(lines[-1] if lines else "")
    return last if len(last) <= width else last[: width - 1] + "…"


def system_line(heartbeat: Any, running: bool, now: float) -> str:
    """``status``'s system line: by the lock (SQLite), or for a stopped cluster."""
    if not running:
        # Judged by the lock, as `health` does: a clean stop releases it at
        # once, a killed process's lock goes with the process. The heartbeat
        # says only who ran last.
        if heartbeat is None:
            return "stopped: no system is running"
        return (
            f"stopped: no system is running (the last one, pid {heartbeat.pid} on"
            f" {visible(heartbeat.host)}, wrote its last heartbeat"
            f" {seconds_text(max(now - heartbeat.at, 0.0))} ago)"
        )
    if heartbeat is None:
        return "running, no heartbeat yet (the first comes status_interval after start)"
    age = now - heartbeat.at
    who = f"pid {heartbeat.pid} on {visible(heartbeat.host)}"
    if heartbeat.stopping:
        # As `health` says: not healthy while the stop's grace runs out.
        return (
            f"stopping: the system is shutting down ({who}, heartbeat"
            f" {seconds_text(max(age, 0.0))} ago): it takes no more messages, running"
            " handlers finish within its grace"
        )
    if age > _admin.default_stale_after(heartbeat):
        return (
            f"running, but its last heartbeat is {seconds_text(age)} old ({who}): its loop or"
            " its store is stuck"
        )
    up = seconds_text(max(now - heartbeat.started_at, 0.0))
    return (
        f"running: heartbeat {seconds_text(max(age, 0.0))} ago from {who}, up {up};"
        f" {heartbeat.processed} processed, last progress"
        f" {seconds_text(max(now - heartbeat.last_progress_at, 0.0))} ago"
    )


def sessions_table(rows: Sequence[_admin.SessionRow], title: str) -> Table:
    """Sessions by state (``status``, ``sessions``)."""
    table = Table(
        "session", "pending", "handed", "in flight", "dead", "oldest", "attempts", title=title
    )
    for column in table.columns[1:]:
        column.justify = "right"
    for row in rows:
        table.add_row(
            cell(row.session_id),
            str(row.pending),
            str(row.handed),
            str(row.in_flight),
            str(row.dead),
            age_text(row.oldest_age),
            str(row.most_attempts),
        )
    return table


def cluster_line(cluster: _admin.ClusterStatus) -> str:
    """``status``'s system line for a running cluster (its members' table follows)."""
    states = Counter(m.state for m in cluster.members if m.alive)
    notes = "".join(f", {n} {state}" for state, n in sorted(states.items()) if state != "running")
    return (
        f"running: {cluster.live} member(s) alive{notes}, holding {cluster.held} of"
        f" {cluster.buckets} buckets"
    )


def members_table(cluster: _admin.ClusterStatus) -> Table:
    """A cluster's members: the first 8 characters of its id, where it runs, how it is."""
    title = f"members: {cluster.live} alive of {cluster.member_count}"
    if len(cluster.members) < cluster.member_count:
        title += f" (the first {len(cluster.members)})"
    table = Table(
        "member", "host", "pid", "state", "buckets", "heartbeat", "up", "processed", title=title
    )
    for column in table.columns[4:]:
        column.justify = "right"
    for m in cluster.members:
        table.add_row(
            m.id[:8],
            cell(m.host),
            str(m.pid),
            m.state,
            str(m.buckets),
            "-" if m.heartbeat_age is None else seconds_text(m.heartbeat_age) + " ago",
            age_text(m.up),
            "-" if m.processed is None else str(m.processed),
        )
    return table


def members_line(cluster: _admin.ClusterStatus) -> str:
    """``health``'s line for a running cluster: each live member and its state."""
    alive = [m for m in cluster.members if m.alive]
    each = "; ".join(f"pid {m.pid} on {visible(m.host)} {m.state}" for m in alive)
    return f"  {cluster.live} member(s) alive: {each}"


def health_details(h: Health) -> str:
    """``health``'s line under the verdict: what it rests on."""
    return (
        f"  oldest due message {age_text(h.oldest_pending_age)}, last progress"
        f" {seconds_text(h.last_progress_age)} ago; pending {h.pending}, in flight"
        f" {h.in_flight}, dead {h.dead}; {h.processed} processed and {h.dead_lettered}"
        " dead-lettered since the system started"
    )
