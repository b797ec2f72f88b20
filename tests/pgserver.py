"""A throwaway PostgreSQL server for the tests, and the choice of which server to use.

The session fixture ``pg_server`` (conftest.py) asks :func:`plan_server` what to
do: use the server named by ``ACTORS_TEST_POSTGRES``, start a throwaway one with
the binaries :func:`find_bindir` found, or skip (fail when ``CI`` is set, so
that CI can never pass by skipping every PostgreSQL test). The choice is a pure
function of the environment so that its tests need not remove any binaries.

A throwaway server is a cluster in a fresh directory, trusting every local
connection, listening on 127.0.0.1 on a free port with its unix socket in that
directory, and set up for speed over durability (fsync off): nothing in it
outlives the run. PostgreSQL refuses to run as root, so as root (CI) the
directory goes to the ``postgres`` user and the binaries run as that user.

Also a command, for poking at a server by hand::

    python -m tests.pgserver start DIR   # prints the URL
    python -m tests.pgserver stop DIR    # stops it and removes DIR
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BINDIR = Path("/usr/lib/postgresql/15/bin")
MIN_MAJOR = 15  # the version the PostgreSQL store is written against
HINT = (
    "PostgreSQL tests need a server: install postgresql-15 "
    "or set ACTORS_TEST_POSTGRES=postgresql://USER@HOST:PORT/DB (a user allowed to CREATE DATABASE)"
)
START_TIMEOUT = 30  # seconds pg_ctl waits for the new server to accept connections
OS_USER = "postgres"  # who runs the server when we are root

# Speed over durability: the cluster is thrown away after the run. 200
# connections because a test may open many (a pool, a connection per actor).
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
}


# -- which server --------------------------------------------------------------


@dataclass(frozen=True)
class Existing:
    """Use the server at ``url`` (its user may CREATE DATABASE)."""

    url: str


@dataclass(frozen=True)
class Throwaway:
    """Start a throwaway server with the binaries in ``bindir``."""

    bindir: Path


@dataclass(frozen=True)
class Unavailable:
    """No server: skip with ``reason`` (one line), or fail when ``fatal``."""

    reason: str
    fatal: bool


Plan = Existing | Throwaway | Unavailable


def plan_server(env: Mapping[str, str], bindir: Path | None, have_psycopg: bool) -> Plan:
    """What the ``pg_server`` fixture does, given the environment, the binaries
    :func:`find_bindir` found (None: none) and whether psycopg is installed."""
    fatal = bool(env.get("CI"))
    if not have_psycopg:
        return Unavailable("PostgreSQL tests need psycopg: pip install -e '.[test]'", fatal)
    if env.get("ACTORS_TEST_POSTGRES"):
        return Existing(env["ACTORS_TEST_POSTGRES"])
    if bindir is not None:
        return Throwaway(bindir)
    reason = HINT
    if env.get("ACTORS_PG_BINDIR"):
        reason += f" (ACTORS_PG_BINDIR={env['ACTORS_PG_BINDIR']} has no initdb and pg_ctl)"
    if fatal:
        reason += " [CI is set: PostgreSQL tests must run, not skip]"
    return Unavailable(reason, fatal)


def find_bindir(env: Mapping[str, str]) -> Path | None:
    """The directory of initdb and pg_ctl: ``ACTORS_PG_BINDIR`` when set (and
    then only it), else PostgreSQL 15's Debian path, else ``pg_config --bindir``
    when that is version 15 or later."""
    if env.get("ACTORS_PG_BINDIR"):
        given = Path(env["ACTORS_PG_BINDIR"])
        return given if _has_binaries(given) else None
    if _has_binaries(BINDIR):
        return BINDIR
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    out = subprocess.run(
        [pg_config, "--version", "--bindir"], capture_output=True, text=True, check=False
    ).stdout.split("\n")
    version = re.match(r"PostgreSQL (\d+)", out[0])
    found = Path(out[1].strip()) if len(out) > 1 else None
    if version and int(version[1]) >= MIN_MAJOR and found and _has_binaries(found):
        return found
    return None


def have_psycopg() -> bool:
    return importlib.util.find_spec("psycopg") is not None


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl"))


# -- a throwaway server --------------------------------------------------------


@contextlib.contextmanager
def throwaway_server(bindir: Path) -> Iterator[str]:
    """A server in a fresh temporary directory for the ``with`` block; its URL.
    Stopped and its directory removed at the end."""
    base = Path(tempfile.mkdtemp(prefix="actors-pg-"))
    try:
        yield start(bindir, base)
    finally:
        stop(bindir, base)


def start(bindir: Path, base: Path) -> str:
    """Make a cluster in ``base`` (new or empty) and start it; the URL of its
    ``postgres`` database, as user ``postgres`` without a password."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(base.iterdir()):
        raise RuntimeError(f"{base} is not empty")
    if os.geteuid() == 0:
        user = pwd.getpwnam(OS_USER)
        os.chown(base, user.pw_uid, user.pw_gid)
    data, log = base / "data", base / "server.log"
    _run(base, bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync",
         "-E", "UTF8", "--locale=C", "--no-instructions")  # fmt: skip
    settings = {**SETTINGS, "unix_socket_directories": f"'{base}'"}
    with (data / "postgresql.conf").open("a") as conf:
        conf.write("".join(f"{name} = {value}\n" for name, value in settings.items()))
    # The port is free when picked but may be taken before the server binds
    # it; once is worth a retry, twice is something else.
    for attempt in range(2):
        port = free_port()
        try:
            _run(base, bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", str(START_TIMEOUT),
                 "-o", f"-p {port}", "start")  # fmt: skip
        except RuntimeError as error:
            if attempt == 1 or "already in use" not in _read(log):
                raise RuntimeError(f"{error}\n--- {log}:\n{_read(log)[-4000:]}") from None
        else:
            return f"postgresql://postgres@127.0.0.1:{port}/postgres"
    raise AssertionError("unreachable")


def stop(bindir: Path, base: Path) -> None:
    """Stop the server in ``base``, if it runs, and remove ``base``."""
    data = base / "data"
    try:
        if (data / "postmaster.pid").exists():
            # immediate: nothing here needs a checkpoint, and it is the quickest.
            _run(base, bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        # Even when pg_ctl failed: a server that lost its directory's lock
        # file shuts itself down.
        shutil.rmtree(base)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(cwd: Path, *command: str | Path) -> None:
    """Run a PostgreSQL binary, as the ``postgres`` user when we are root.

    cwd is the server's directory, one the ``postgres`` user can enter."""
    args = [str(arg) for arg in command]
    if os.geteuid() == 0:
        args = ["runuser", "-u", OS_USER, "--", *args]
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- a fresh database per test -------------------------------------------------

_SESSION = secrets.token_hex(3)  # concurrent runs may share an ACTORS_TEST_POSTGRES server
_numbers = itertools.count(1)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server at ``server_url`` for the ``with``
    block; its URL. Dropped at the end, even with connections still open."""
    import psycopg
    from psycopg import sql

    name = f"actors_test_{next(_numbers)}_{_SESSION}"
    # template0: the smallest template, and one nobody connects to, which
    # CREATE DATABASE requires of its template.
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield database_url(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def database_url(server_url: str, name: str) -> str:
    """``server_url`` (a URL or a key=value string) naming database ``name``."""
    if "://" in server_url:
        return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    from psycopg.conninfo import make_conninfo

    return make_conninfo(server_url, dbname=name)


# -- by hand -------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.pgserver start|stop DIR", file=sys.stderr)
        return 2
    bindir = find_bindir(os.environ)
    if bindir is None:
        print(HINT, file=sys.stderr)
        return 1
    base = Path(argv[1]).absolute()
    if argv[0] == "start":
        print(start(bindir, base))
    elif (base / "data" / "PG_VERSION").exists():
        stop(bindir, base)
    else:
        print(f"{base} holds no server of ours", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
