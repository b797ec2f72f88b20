"""The command line's option types, run_system's options as options, and the
tokens of ``actors serve`` (kept apart from _cli.py, the commands)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import click

from ._validate import MAX_SECONDS
from .store.backends import is_url


class Finite(click.FloatRange):
    """A finite number in a range (``nan`` and ``inf`` pass a FloatRange)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


NO_LIMIT = "none"  # (not None: None is an option not given)


class _SecondsOrNone(Finite):
    """Seconds, or ``none`` for no limit (``--handler-timeout none``)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() == "none":
            return NO_LIMIT
        return super().convert(value, param, ctx)


_COUNT = click.IntRange(1, 2**31 - 1)
_SECONDS = Finite(min=0, max=MAX_SECONDS)
# run_system's options that a command line can give: (option, type, help).
# Only those given reach run_system, which checks them and refuses the
# ones meaningless for the database (durability on PostgreSQL, ...).
SYSTEM_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("max_attempts", _COUNT, "Handler attempts per message before it is dead-lettered."),
    (
        "handler_timeout",
        _SecondsOrNone(min=0, max=MAX_SECONDS),
        "Seconds a handler may run (none: no limit).",
    ),
    ("idle_timeout", _SECONDS, "Seconds an idle actor waits before it is passivated."),
    ("max_active", _COUNT, "Most session actors alive at once."),
    ("fair_share", _COUNT, "Messages an actor runs in a row while others wait for a slot."),
    ("durability", click.Choice(["normal", "full"]), "SQLite: survive a crash, or power loss."),
    ("max_message_bytes", _COUNT, "Largest encoded body a send accepts."),
    (
        "shutdown_timeout",
        _SECONDS,
        "Seconds running handlers (and open requests) get to finish at a stop.",
    ),
    ("mailbox_size", _COUNT, "Messages handed to one actor ahead of the one it runs."),
    ("busy_timeout", _SECONDS, "SQLite: seconds to wait for another connection's lock."),
    ("key_retention", _SECONDS, "Seconds an idempotency key is remembered after processing."),
    ("status_interval", _SECONDS, "Seconds between backlog events and heartbeats."),
    ("control_interval", _SECONDS, "Seconds between looks at the control table."),
    ("lease_ttl", _SECONDS, "PostgreSQL: seconds a process holds its sessions unrenewed."),
    ("buckets", _COUNT, "PostgreSQL: buckets sessions hash into (fixed at schema creation)."),
)


def system_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add a ``--max-attempts``-style option for each of SYSTEM_OPTIONS."""
    for name, kind, text in reversed(SYSTEM_OPTIONS):
        flag = "--" + name.replace("_", "-")
        command = click.option(flag, name, type=kind, default=None, help=text)(command)
    return command


def token_roles(token_file: str | None, db: str) -> tuple[dict[str, Any], str | None, bool]:
    """The tokens of ``--token-file``; else those of the file beside the database
    (made with a new token the first time); that file's path; whether it is new.

    The generated file is kept from one start to the next: a client that saved
    the token goes on working after a restart, and a second ``serve`` on a
    database already served (which then fails on its lock) changes nothing.
    """
    from .http import Role
    from .http._serve import new_token_file

    if token_file is not None:
        return read_tokens(token_file, "--token-file"), None, False
    where = "actors-serve.token" if is_url(db) else f"{db}.token"
    if os.path.exists(where):
        return read_tokens(where, None), where, False
    try:
        token = new_token_file(where)
    except OSError as exc:
        raise click.ClickException(f"cannot write a token to {where!r}: {exc}") from None
    return {token: Role.ALL}, where, True


def read_tokens(path: str, option: str | None) -> dict[str, Any]:
    from .http import parse_token_lines

    hint = option or path
    try:
        with open(path, encoding="utf-8") as file:
            found = parse_token_lines(file)
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read it: {exc}", param_hint=hint) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None
    if not found:
        raise click.BadParameter("it holds no token", param_hint=hint)
    return found
