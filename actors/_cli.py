"""The ``actors`` command (also ``python -m actors``): demo, inspect, operate, health.

The database is an SQLite file, or a PostgreSQL database named by its URL
(``postgresql://...``): there a system is a cluster of processes, each a
member. Read commands (``status``, ``sessions``, ``dead``, ``health``)
open the database read-only; they work while a system runs and never
disturb it. Mutating commands (``retry``, ``abort``, ``purge``) ask a
running system through the control table and wait for its answer, or,
with no system running, act directly: on SQLite holding the database's
lock (see ``_control``); on PostgreSQL when no member is alive.

Exit codes, for scripts and probes:

- 0: done; healthy.
- 1: unhealthy; a command refused (no such message, in flight, ...); the
  demo found a message lost or out of order.
- 2: usage error; no database at the path, or not an actors database.
- 3: ``health`` only: no system is running on the database.
- 4: a running system did not answer a request within ``--wait``.

With ``--json`` every outcome is one JSON object on stdout, errors
included: ``{"ok": false, "error": ..., "exit_code": n}`` (the exit code is
the same as without ``--json``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NoReturn

import click
import trio
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__, _admin
from ._cli_options import NO_LIMIT, Finite, system_options, token_roles
from ._cli_show import (
    age_text,
    cell,
    cluster_line,
    health_details,
    members_line,
    members_table,
    one_line,
    sessions_table,
    system_line,
    visible,
)
from ._codec import check_session_id
from ._control import (
    CONTROL_RETENTION,
    DirectTarget,
    RequestTimeoutError,
    SystemStoppedError,
    apply,
    request,
)
from ._demo import (
    DemoDatabaseError,
    DemoOptions,
    LiveDisplay,
    Report,
    check_demo_database,
    run_demo,
)
from ._errors import DatabaseInUseError, StoreError
from ._health import seconds_text
from ._lock import DatabaseLock
from ._validate import MAX_INT, MAX_SECONDS
from .store import StoreViews, database_path
from .store.backends import is_url, open_for_changes, redact

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_TIMEOUT = 4


class DatabaseError(click.ClickException):
    """No usable actors database at the path given (exit code 2)."""

    exit_code = EXIT_USAGE


class _JsonError(click.ClickException):
    """An error of a command run with ``--json``: shown as a JSON object on stdout."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        # (click declares exit_code on the class; each of these has its own.)
        vars(self)["exit_code"] = exit_code

    def show(self, file: Any = None) -> None:
        _echo_json({"ok": False, "error": self.message, "exit_code": self.exit_code})


# Ids, seqs and limits are SQLite integers: beyond MAX_INT they cannot be stored.
ID = click.IntRange(1, MAX_INT)
LIMIT = click.IntRange(1, MAX_INT)


def _session_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_session_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds, or a number with a unit: ``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w``.

    Raises:
      ValueError: not a duration.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 12h or 7d")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    # The library takes at most 10**9 s (about 31.7 years; see _validate):
    # a longer one is this command's usage error, not the system's refusal.
    if not seconds <= MAX_SECONDS:
        raise ValueError(f"{text!r} is too long a duration (at most {MAX_SECONDS:g} seconds)")
    return seconds


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _console() -> Console:
    # No markup, no emoji codes, no highlighting: session ids, error texts
    # and paths are the users' data, shown as they are (see visible()).
    return Console(highlight=False, soft_wrap=False, markup=False, emoji=False)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(_admin.to_plain(value), indent=2, allow_nan=False))


def _path(db: str) -> str:
    if is_url(db):
        return db  # (checked when connecting; shown without its password)
    try:
        # Refuses what SQLite cannot open (a name the shell passed with
        # undecodable bytes: a lone surrogate here) and a directory.
        return database_path(db)
    except ValueError as exc:
        raise DatabaseError(str(exc)) from None


def _shown(path: str) -> str:
    """The database as messages show it: a URL without its password."""
    return redact(path) if is_url(path) else path


def _open(path: str) -> StoreViews:
    try:
        return _admin.open_readonly(path)
    except _admin.AdminError as exc:
        raise DatabaseError(str(exc)) from None


def _read(path: str, read: Callable[[StoreViews], Any]) -> Any:
    views = _open(path)
    try:
        return read(views)
    except StoreError as exc:  # ("cannot read <path>: ...")
        raise click.ClickException(str(exc)) from None
    finally:
        views.close()


db_argument = click.argument("db", metavar="DB")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
session_option = click.option(
    "--session", "session_id", metavar="S", callback=_session_option, help="Only this session."
)
wait_option = click.option(
    "--wait",
    type=Finite(min=0, max=MAX_SECONDS, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for a running system to apply the request (exit 4 after).",
)


def _wants_json(args: Sequence[str]) -> bool:
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


class _Group(click.Group):
    """The command group; with ``--json``, a command's errors are JSON too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["actors.json"] = _wants_json(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if ctx.meta.get("actors.json") and not isinstance(exc, _JsonError):
                raise _JsonError(exc.format_message(), exc.exit_code) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="actors", message="%(prog)s %(version)s")
def cli() -> None:
    """Embedded, durable, per-key actors for trio on SQLite or PostgreSQL.

    DB is the database of a system: its SQLite file, or a PostgreSQL URL
    (postgresql://USER:PASSWORD@HOST/NAME). Read commands work while it runs;
    retry, abort and purge are applied by the running system (or directly
    when none runs). Exit codes: 0 ok, 1 unhealthy or refused, 2 usage
    error or no actors database, 3 no system running (health), 4 no answer
    from the running system within --wait. With --json, errors are JSON
    too (on stdout), with the same exit codes.
    """


# -- demo -------------------------------------------------------------------------

_DEMO = DemoOptions()
MAX_DEMO_SESSIONS = 100_000
MAX_DEMO_MESSAGES = 1_000_000  # per session
MAX_DEMO_DURATION = 86_400.0


def _demo_db(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    if is_url(value):
        raise click.BadParameter(
            "the demo runs on an SQLite file, not a PostgreSQL URL", ctx, param
        )
    try:
        # Only a new file or one the demo made: never an application's
        # database, whose messages the demo's handler would run.
        return check_demo_database(_path(value))
    except DatabaseError as exc:
        raise click.BadParameter(exc.message, ctx, param) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@cli.command()
@click.option(
    "--db",
    metavar="PATH",
    callback=_demo_db,
    help="SQLite file to use (kept afterwards, with its ledger PATH.demo-ledger; default: a "
    "fresh file in a temporary directory, deleted at the end). A new file, or one an earlier "
    "demo made: any other database is refused. Run again on the same file after killing a "
    "run: the new run checks the killed run's messages too.",
)
@click.option(
    "--sessions",
    type=click.IntRange(1, MAX_DEMO_SESSIONS),
    default=_DEMO.sessions,
    show_default=True,
)
@click.option(
    "--messages",
    type=click.IntRange(1, MAX_DEMO_MESSAGES),
    default=_DEMO.messages,
    show_default=True,
    help="Messages per session.",
)
@click.option(
    "--duration",
    type=Finite(0, MAX_DEMO_DURATION),
    default=_DEMO.duration,
    show_default=True,
    metavar="SECONDS",
    help="Seconds over which each session spreads its sends (0: as fast as it can).",
)
@click.option("--seed", type=int, help="Seed for the workload's randomness.")
@click.option(
    "--fail-rate",
    type=Finite(0, 1),
    default=_DEMO.fail_rate,
    show_default=True,
    help="Chance that an attempt raises.",
)
@click.option(
    "--poison-rate",
    type=Finite(0, 1),
    default=_DEMO.poison_rate,
    show_default=True,
    help="Chance that a message fails on every attempt.",
)
@click.option(
    "--kill-interval",
    type=Finite(min=0, max=MAX_SECONDS, min_open=True),
    default=_DEMO.kill_interval,
    show_default=True,
    metavar="SECONDS",
    help="Mean time between kills of a busy actor.",
)
@click.option("--verbose", is_flag=True, help="Show the library's log (every failed attempt).")
def demo(
    db: str | None,
    sessions: int,
    messages: int,
    duration: float,
    seed: int | None,
    fail_rate: float,
    poison_rate: float,
    kill_interval: float,
    verbose: bool,
) -> None:
    """Run a chaos workload and verify that nothing was lost.

    Many sessions send concurrently for about --duration seconds; the
    handler sleeps, sometimes fails, rarely hangs; random busy actors are
    killed mid-message. At the end every id that send() returned (in this
    run, and in earlier runs on the same --db, a killed one's too) must
    have been processed, dead-lettered, or still be pending. Exit status 1
    if anything was lost, an ordering check failed, or drain() timed out.
    """
    # The demo fails on purpose; without --verbose keep the library's log quiet.
    logging.basicConfig(
        level=logging.INFO if verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    console = _console()
    live = console.is_terminal and not verbose
    options = DemoOptions(
        db=db,
        sessions=sessions,
        messages=messages,
        duration=duration,
        seed=seed,
        fail_rate=fail_rate,
        poison_rate=poison_rate,
        kill_interval=kill_interval,
        progress_interval=0.1 if live else _DEMO.progress_interval,
    )

    report = _run_demo(options, console, live)
    click.echo(f"\nverification after {report.seconds:.1f}s")
    _show_verdict(report, console, live)


def _run_demo(options: DemoOptions, console: Console, live: bool) -> Report:
    try:
        if live:

            def out(text: str) -> None:
                console.print(text, markup=False, soft_wrap=True)

            with LiveDisplay(console, options.sessions * options.messages) as display:
                return trio.run(run_demo, options, out, display.update)
        # click.echo flushes every line: output to a file or a pipe is
        # block-buffered, and a run killed with kill -9 would otherwise
        # take its last progress lines along (tests check they arrive).
        return trio.run(run_demo, options, click.echo)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: unfinished messages stay in the database (see --db)")
        sys.exit(130)
    except BaseException as exc:
        _demo_error(exc)
        raise


def _show_verdict(report: Report, console: Console, live: bool) -> NoReturn:
    """Print the verification table and the verdict; exit 0 if it is OK, else 1."""
    if live:
        table = Table("check", "count", "meaning")
        table.columns[1].justify = "right"
        for name, value, meaning in report.rows():
            bad = value and name in (
                "lost",
                "out of order",
                "overlapping",
                "dishonest attempts",
                "pending",
                "earlier pending",
            )
            table.add_row(name, Text(str(value), style="red" if bad else ""), meaning)
        console.print(table)
    else:
        click.echo(report.table())
    if report.ok:
        earlier = " (earlier runs' too)" if report.earlier_sent else ""
        click.echo(
            f"\nOK: every acknowledged message{earlier} was processed or dead-lettered, in order."
        )
        sys.exit(EXIT_OK)
    if report.lost or report.out_of_order or report.overlapping or report.dishonest_attempts:
        click.echo("\nFAILED: see the non-zero checks above.")
    else:
        click.echo(
            "\nUNFINISHED: nothing was lost, but some messages are still pending"
            " (drain() timed out); run again on the same --db to finish them."
        )
    sys.exit(EXIT_FAILED)


def _demo_error(exc: BaseException) -> None:
    """A database the demo cannot use: a clear error, not a traceback."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, DatabaseInUseError):
        raise click.ClickException(str(exc)) from None
    if isinstance(exc, StoreError | DemoDatabaseError):
        raise DatabaseError(str(exc)) from None


# -- reading ----------------------------------------------------------------------


def _lock_held(path: str) -> bool:
    """Whether a system holds an SQLite file's lock. (A cluster's members say
    whether it runs themselves: ``_admin`` reads their leases in its snapshot.)"""
    return not is_url(path) and _admin.is_running(path)


def _plain(record: _admin.Status | _admin.HealthReport) -> Any:
    """A record as JSON-ready data; ``cluster`` only for a cluster (SQLite's unchanged)."""
    plain = _admin.to_plain(record)
    if plain.get("cluster", False) is None:
        del plain["cluster"]
    return plain


@cli.command()
@db_argument
@json_option
@click.option(
    "--limit",
    type=LIMIT,
    default=20,
    show_default=True,
    help="Sessions and in-flight messages to list.",
)
def status(db: str, as_json: bool, limit: int) -> None:
    """Queue depth by session and state, oldest due message, in flight, retries."""
    path = _path(db)
    _open(path).close()  # exit 2 first if there is no actors database
    running = _lock_held(path)
    now = time.time()
    st: _admin.Status = _read(
        path, lambda views: _admin.status(views, now, limit=limit, running=running)
    )
    if as_json:
        _echo_json(_plain(st))
        return
    console = _console()
    due = st.pending - st.delayed - st.retry_waiting
    attempts = ", ".join(f"{n} with {a}" for a, n in st.attempts.items())
    oldest = st.oldest_pending_age
    summary = Table.grid(padding=(0, 2))
    summary.add_column(no_wrap=True)
    summary.add_column(overflow="fold")
    summary.add_row("database", f"{visible(st.path)} (schema {st.schema_version})")
    if st.cluster is not None and st.running:
        summary.add_row("system", cluster_line(st.cluster))
    else:
        summary.add_row("system", system_line(st.heartbeat, st.running, now))
    summary.add_row(
        "pending",
        f"{st.pending} ({due} due, {st.delayed} delayed, {st.retry_waiting} waiting for a retry)",
    )
    left = "" if st.running else ": left by a process that died; the next start takes them back"
    summary.add_row(
        "handed",
        f"{st.handed} (claimed by an actor, waiting in its memory, not started){left}"
        if st.handed
        else "0",
    )
    summary.add_row(
        "in flight",
        f"{st.in_flight} (a handler started){left}" if st.in_flight else "0",
    )
    summary.add_row("dead", str(st.dead))
    summary.add_row(
        "oldest",
        "no message is due" if oldest is None else f"a due message has waited {age_text(oldest)}",
    )
    summary.add_row(
        "attempts",
        f"unfinished messages by attempts used: {attempts}" if attempts else "none used yet",
    )
    summary.add_row("requests", f"{st.open_requests} control request(s) waiting for the system")
    console.print(summary)
    if st.cluster is not None and st.cluster.members:
        console.print(members_table(st.cluster))
    if st.sessions:
        title = f"sessions: the {len(st.sessions)} deepest of {st.session_count}"
        console.print(sessions_table(st.sessions, title))
    if st.in_flight_messages:
        table = Table("id", "session", "attempt", "age", title=f"in flight: {st.in_flight}")
        for m in st.in_flight_messages:
            table.add_row(str(m.id), cell(m.session_id), str(m.attempt), seconds_text(m.age))
        console.print(table)


@cli.command()
@db_argument
@json_option
@session_option
@click.option("--limit", type=LIMIT, default=100, show_default=True)
def sessions(db: str, as_json: bool, session_id: str | None, limit: int) -> None:
    """Sessions with messages, deepest queue first: pending, handed, in flight, dead."""
    path = _path(db)
    now = time.time()
    rows: list[_admin.SessionRow]
    rows, count = _read(
        path, lambda views: _admin.sessions(views, now, limit=limit, session_id=session_id)
    )
    if as_json:
        _echo_json(rows)
        return
    title = (
        f"sessions: {count}"
        if len(rows) == count
        else f"sessions: the {len(rows)} deepest of {count}"
    )
    _console().print(sessions_table(rows, title))


@cli.command()
@db_argument
@json_option
@session_option
@click.option("--limit", type=LIMIT, default=100, show_default=True)
def dead(db: str, as_json: bool, session_id: str | None, limit: int) -> None:
    """Dead letters, oldest first, with their last error (in full with --json)."""
    path = _path(db)
    now = time.time()
    letters, count = _read(path, lambda views: _admin.dead_letters(views, session_id, limit))
    if as_json:
        _echo_json(letters)
        return
    title = (
        f"dead: {count}" if len(letters) == count else f"dead: the {len(letters)} oldest of {count}"
    )
    table = Table("id", "session", "attempts", "sent", "last error", title=title)
    for d in letters:
        table.add_row(
            str(d.id),
            cell(d.session_id),
            str(d.attempts),
            seconds_text(max(now - d.enqueued_at, 0.0)) + " ago",
            Text(one_line(d.last_error)),
        )
    _console().print(table)


@cli.command()
@db_argument
@json_option
@click.option(
    "--stall-after",
    type=Finite(min=0, max=MAX_SECONDS, min_open=True),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Unhealthy when a due message waited this long and nothing completed for this long.",
)
@click.option(
    "--stale-after",
    type=Finite(min=0, max=MAX_SECONDS, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Unhealthy when the heartbeat is older than this "
    "(default: the larger of 10 s and 5 x the system's status_interval).",
)
def health(db: str, as_json: bool, stall_after: float, stale_after: float | None) -> None:
    """Whether the system on DB makes progress. Exit 0 healthy, 1 not, 3 none running."""
    path = _path(db)
    _open(path).close()  # exit 2 first if there is no actors database
    running = _lock_held(path)
    now = time.time()
    report: _admin.HealthReport = _read(
        path,
        lambda views: _admin.check_health(
            views, now, running=running, stall_after=stall_after, stale_after=stale_after
        ),
    )
    code = EXIT_OK if report.healthy else EXIT_FAILED if report.running else EXIT_NOT_RUNNING
    if as_json:
        _echo_json({**_plain(report), "exit_code": code})
    else:
        verdict = "healthy" if report.healthy else "unhealthy" if report.running else "not running"
        click.echo(f"{verdict}: {visible(report.reason)}")
        if report.health is not None:
            click.echo(health_details(report.health))
        if report.cluster is not None and report.running:
            click.echo(members_line(report.cluster))
    sys.exit(code)


# -- changing ---------------------------------------------------------------------


async def _apply_directly(
    path: str, command: str, args: dict[str, Any], finish: int | None = None
) -> dict[str, Any]:
    """Apply a command to a database no system runs on (SQLite: the caller holds its lock).

    ``finish``: a control request that a stopped system had taken without
    answering; its outcome is written into it, so that no later system
    applies it again.
    """
    store = await open_for_changes(path)
    try:
        outcome = await apply(DirectTarget(store), command, json.dumps(args))
        if finish is not None:
            now = time.time()
            await store.finish_control(finish, now, json.dumps(outcome), now - CONTROL_RETENTION)
        return outcome
    finally:
        await store.aclose()


def _fail(as_json: bool, message: str, code: int, **extra: Any) -> NoReturn:
    if as_json:
        _echo_json({"ok": False, "error": message, **extra, "exit_code": code})
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _watch(path: str) -> tuple[Callable[[], bool], Callable[[], None]]:
    """``stopped()``: whether no system runs on the database now; ``release()`` when done.

    SQLite: a yes takes the database's lock, which no system can take until
    ``release()``. PostgreSQL: a yes means no member's lease is current, and
    nothing is locked: the change is safe beside a member that starts at
    that moment (operators' changes are not fenced), but that member's
    counts (``statistics()``) may be of the messages before the change.
    """
    if is_url(path):
        views = _open(path)

        def none_alive() -> bool:
            membership = views.membership()
            return membership is None or not any(m.alive for m in membership.members)

        return none_alive, views.close
    lock = DatabaseLock(path)

    def stopped() -> bool:
        """Whether the system let go of the lock; if so, it is ours now."""
        try:
            lock.acquire()
        except DatabaseInUseError:
            return False
        return True

    return stopped, lock.release


def _mutate(db: str, command: str, args: dict[str, Any], wait: float, as_json: bool) -> NoReturn:
    """Apply a command through the running system, or directly if none runs; exit."""
    path = _path(db)
    _open(path).close()  # exit 2 if there is no actors database (never create one)
    stopped, release = _watch(path)
    try:
        try:
            running = not stopped()
        except OSError as exc:
            raise click.ClickException(f"cannot lock {_shown(path)!r}: {exc}") from None
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        finish = None
        applied_by = "command line"
        where = "directly: no system is running"
        if running:
            try:
                outcome = request(path, command, args, wait=wait, stopped=stopped)
                applied_by, where = "running system", "by the running system"
            except SystemStoppedError as exc:
                # It stopped (a stopping system takes no more requests): apply
                # the command here, as if none had run; a request it had taken
                # gets its outcome, so that no later system applies it again.
                finish = None if exc.withdrawn else exc.request_id
                where = "directly: the system stopped before it answered"
            except RequestTimeoutError as exc:
                _fail(as_json, str(exc), EXIT_TIMEOUT, withdrawn=exc.withdrawn)
            except StoreError as exc:  # ("cannot write the request into <path>: ...")
                raise click.ClickException(str(exc)) from None
            except OSError as exc:
                raise click.ClickException(f"cannot lock {_shown(path)!r}: {exc}") from None
        if applied_by == "command line":
            try:
                outcome = trio.run(_apply_directly, path, command, args, finish)
            except StoreError as exc:
                raise click.ClickException(str(exc)) from None
    finally:
        release()
    code = EXIT_OK if outcome["ok"] else EXIT_FAILED
    if as_json:
        extra = {} if outcome["ok"] else {"exit_code": code}
        _echo_json({**outcome, "applied_by": applied_by, **extra})
    elif outcome["ok"]:
        click.echo(f"{visible(outcome['detail'])} (applied {where})")
    else:
        click.echo(f"error: {visible(outcome['error'])} (answered {where})", err=True)
    sys.exit(code)


@cli.command()
@db_argument
@click.option("--id", "message_id", type=ID, help="The dead letter to requeue.")
@click.option("--all", "retry_all", is_flag=True, help="Requeue every dead letter.")
@wait_option
@json_option
def retry(db: str, message_id: int | None, retry_all: bool, wait: float, as_json: bool) -> None:
    """Requeue a dead letter (--id N) or all of them (--all) with fresh attempts."""
    if (message_id is None) == (not retry_all):
        raise click.UsageError("give exactly one of --id N and --all")
    args: dict[str, Any] = {"all": True} if retry_all else {"id": message_id}
    _mutate(db, "retry", args, wait, as_json)


@cli.command()
@db_argument
@click.option("--id", "message_id", type=ID, required=True, help="The message to delete.")
@wait_option
@json_option
def abort(db: str, message_id: int, wait: float, as_json: bool) -> None:
    """Delete a pending or dead message (refused while a handler runs it)."""
    _mutate(db, "abort", {"id": message_id}, wait, as_json)


@cli.command()
@db_argument
@click.option(
    "--session",
    "session_id",
    metavar="S",
    callback=_session_option,
    help="Purge this session's messages.",
)
@click.option("--dead", is_flag=True, help="Purge dead letters only.")
@click.option(
    "--older-than",
    callback=_duration_option,
    metavar="DURATION",
    help="With --dead: only those sent longer ago than this (90s, 15m, 12h, 7d, 2w).",
)
@wait_option
@json_option
def purge(
    db: str,
    session_id: str | None,
    dead: bool,
    older_than: float | None,
    wait: float,
    as_json: bool,
) -> None:
    """Delete messages for good: a session's pending and dead ones, or dead letters.

    --session S deletes S's pending and dead messages (not one in flight);
    --dead deletes dead letters (of S only with --session), and with
    --older-than only those sent longer ago than that.
    """
    if older_than is not None and not dead:
        raise click.UsageError("--older-than applies to dead letters: add --dead")
    if session_id is None and not dead:
        raise click.UsageError("give --session S, or --dead (with --older-than DURATION)")
    args = {"session": session_id, "dead": dead, "older_than": older_than}
    _mutate(db, "purge", args, wait, as_json)


# -- serve ------------------------------------------------------------------------


@cli.command()
@click.argument("target", metavar="DB")
@click.option(
    "--handler",
    "handler_spec",
    required=True,
    metavar="MODULE:FUNCTION",
    help="The handler (or Actor class), as package.module:name.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: a free one, printed).",
)
@click.option(
    "--token-file",
    metavar="PATH",
    help="Tokens, one a line: a bare token may do "
    "everything; read:T, send:T, admin:T limit T's role. Default: a new token, "
    "written to DB.token (readable by you only).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds a client may take to send a request: a slow one loses its connection.",
)
@system_options
def serve(
    target: str,
    handler_spec: str,
    host: str,
    port: int,
    token_file: str | None,
    read_timeout: float,
    **options: Any,
) -> None:
    """Run the system on DB and its HTTP API in one process, until SIGTERM or SIGINT.

    A stop is graceful: no handler starts any more, running ones get
    --shutdown-timeout seconds and their acknowledgements commit; exit 0.
    Needs the http extra (pip install 'actors[http]').
    """
    try:
        from .http._serve import load_handler, run_server
    except ImportError as exc:
        raise click.ClickException(f"{exc} (pip install 'actors[http]')") from None
    path = _path(target)
    try:
        handler = load_handler(handler_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--handler") from None
    tokens, written, new = token_roles(token_file, target)
    given = {name: value for name, value in options.items() if value is not None}
    if given.get("handler_timeout") == NO_LIMIT:
        given["handler_timeout"] = None

    def out(text: str) -> None:
        click.echo(f"actors: {text}", err=True)

    if written is not None:
        out(
            f"{'a new' if new else 'the'} token is in {written} (readable by you only):"
            " send it as Authorization: Bearer <token>"
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        trio.run(
            partial(
                run_server,
                path,
                handler,
                host=host,
                port=port,
                tokens=tokens,
                options=given,
                out=out,
                read_timeout=read_timeout,
            )
        )
    except BaseException as exc:
        error = _single(exc)
        if isinstance(error, TypeError | ValueError):  # run_system's options
            raise click.UsageError(str(error)) from None
        if isinstance(error, DatabaseInUseError | StoreError):
            raise click.ClickException(str(error)) from None
        if isinstance(error, OSError):  # (the address: in use, or not ours)
            raise click.ClickException(f"cannot listen on {host}:{port}: {error}") from None
        raise
    sys.exit(EXIT_OK)


def _single(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None, prog_name: str = "actors") -> None:
    """Run the command line (exits the process with its exit code)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name=prog_name)
