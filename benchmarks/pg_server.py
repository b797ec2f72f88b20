"""The PostgreSQL server of ``python -m benchmarks.pg``: starting it, its settings, what it did.

A throwaway server (tests/pgserver.py) in a temporary directory on the real
disk, or the one ``ACTORS_BENCH_POSTGRES`` names (its settings are only
reported then, not changed). Two setting profiles:

- ``durable`` (the default): ``fsync``, ``synchronous_commit`` and
  ``full_page_writes`` on, as a production server runs: every COMMIT waits
  for its WAL to be flushed to disk.
- ``fast``: the three off, as tests/pgserver.py sets its servers up.

Either way ``shared_buffers`` is 256MB and ``pg_stat_statements`` is loaded
(its counts are the round trips per message), with ``track_wal_io_timing``.

What the server did during a span, read by :func:`snapshot` before and after:

- CPU of its whole process tree, from ``/proc``: every child of the
  postmaster (backends, the WAL writer, the checkpointer, autovacuum), plus
  the postmaster's own time and its *children's* (``cutime``, ``cstime``:
  a backend that exited, when its connection closed, is counted there once
  the postmaster reaped it);
- the next transaction id (``pg_current_snapshot()``'s xmax): how many
  transactions *wrote* (a read-only one takes no id), exactly, at once;
- the WAL position (bytes of WAL written);
- ``pg_stat_wal`` and ``pg_stat_database``: cumulative statistics, which a
  backend flushes at most once a second, and an idle one up to ten seconds
  later: read over the workers' whole lives (their start and stop
  included), after they exited (an exiting backend flushes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

SETTINGS: dict[str, dict[str, str]] = {
    "durable": {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"},
    "fast": {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
}
# Set once, with a restart (shared_buffers and the preloaded library need one).
COMMON = {
    "shared_buffers": "256MB",
    "max_connections": "200",
    "shared_preload_libraries": "pg_stat_statements",
    "track_wal_io_timing": "on",
}


class Server:
    """A PostgreSQL server to run the benchmark on (see the module)."""

    def __init__(self, url: str, owned: bool, base: Path | None, bindir: Path | None) -> None:
        self.url = url
        self.owned = owned  # started here (its settings are ours to change)
        self.base = base
        self.bindir = bindir
        self.profile = "as found"
        with psycopg.connect(url, autocommit=True) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            self.version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            # (While the backend lives: its parent is the postmaster. None if
            # /proc cannot see it: a server on another host.)
            self.postmaster = _ppid(pid)

    def use(self, profile: str) -> None:
        """Switch to a setting profile (reloaded; no restart needed for these)."""
        if not self.owned:
            raise RuntimeError("the settings of a server given by ACTORS_BENCH_POSTGRES are kept")
        with psycopg.connect(self.url, autocommit=True) as conn:
            for name, value in SETTINGS[profile].items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
            conn.execute("SELECT pg_reload_conf()")
            # (The reload is asynchronous: wait until this connection sees it.)
            deadline = time.monotonic() + 10
            want = SETTINGS[profile]["fsync"]
            while conn.execute("SHOW fsync").fetchone()[0] != want:  # type: ignore[index]
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not reload its settings")
                time.sleep(0.05)
                conn.close()
                conn = psycopg.connect(self.url, autocommit=True)
        self.profile = profile

    def settings(self) -> dict[str, str]:
        names = [
            *SETTINGS["durable"],
            "shared_buffers",
            "wal_sync_method",
            "max_wal_size",
            "checkpoint_timeout",
            "wal_level",
        ]
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (names,)
            ).fetchall()
        return {n: f"{s}{'' if not u or u == 'bool' else ' ' + u}" for n, s, u in rows}

    @contextlib.contextmanager
    def database(self, name: str) -> Iterator[str]:
        """A new database for one run; dropped after it."""
        from tests.pgserver import database_url

        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        try:
            yield database_url(self.url, name)
        finally:
            with psycopg.connect(self.url, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )

    def cpu(self) -> float | None:
        """CPU seconds of the server's process tree so far (see the module); None if unseen."""
        if self.postmaster is None:
            return None
        return _tree_cpu(self.postmaster)

    def fsync_probe(self, seconds: float = 0.5) -> float | None:
        """Median seconds of an 8 kB write + fdatasync in the server's directory (or None)."""
        where = self.base if self.base is not None else None
        if where is None:
            return None
        samples = []
        fd, path = tempfile.mkstemp(dir=where)
        try:
            block = os.urandom(8192)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                os.pwrite(fd, block, 0)
                os.fdatasync(fd)
                samples.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
            os.unlink(path)
        samples.sort()
        return samples[len(samples) // 2]

    def stop(self) -> None:
        if self.owned and self.base is not None and self.bindir is not None:
            from tests import pgserver

            pgserver.stop(self.bindir, self.base)


def open_server() -> Server:
    """The server ``ACTORS_BENCH_POSTGRES`` names, or a throwaway one set up here."""
    url = os.environ.get("ACTORS_BENCH_POSTGRES")
    if url:
        return Server(url, owned=False, base=None, bindir=None)
    from tests import pgserver

    bindir = pgserver.find_bindir(os.environ)
    if bindir is None:
        raise SystemExit(pgserver.HINT.replace("ACTORS_TEST_POSTGRES", "ACTORS_BENCH_POSTGRES"))
    base = Path(tempfile.mkdtemp(prefix="actors-bench-pg-"))
    url = pgserver.start(bindir, base)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for name, value in COMMON.items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
        # (pg_ctl restart keeps the port and the options it was started with.)
        pgserver._run(
            base,
            bindir / "pg_ctl",
            "-D",
            base / "data",
            "-l",
            base / "server.log",
            "-w",
            "-t",
            "60",
            "restart",
        )
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        server = Server(url, owned=True, base=base, bindir=bindir)
    except BaseException:
        pgserver.stop(bindir, base)
        raise
    return server


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def _ppid(pid: int) -> int | None:
    try:
        return int(_stat(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def _tree_cpu(postmaster: int) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    fields = _stat(postmaster)
    # utime, stime, cutime, cstime of the postmaster: its children that ended are in c*.
    total = sum(int(x) for x in fields[11:15])
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = _stat(int(entry))
        except (OSError, ValueError):
            continue
        if f[1] == str(postmaster):
            total += int(f[11]) + int(f[12])  # (a live child's own children: none)
    return total / tick


def snapshot(server: Server) -> dict[str, Any]:
    """What is read at once before and after a span (see the module; cluster-wide
    figures, read on the server's own database, not the benchmark's)."""
    with psycopg.connect(server.url, autocommit=True) as conn:
        xid, lsn = conn.execute(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
        ).fetchone()  # type: ignore[misc]
    return {"cpu": server.cpu(), "xid": int(xid), "wal": int(lsn), "at": time.monotonic()}


def lifetime_stats(url: str, dbname: str) -> dict[str, Any]:
    """Cumulative statistics (lagging: see the module), of the database and of the WAL."""
    with psycopg.connect(url, autocommit=True) as conn:
        db = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted"
            " FROM pg_stat_database WHERE datname = %s",
            (dbname,),
        ).fetchone()
        wal = conn.execute(
            "SELECT wal_records, wal_fpi, wal_bytes, wal_write, wal_sync,"
            " wal_sync_time FROM pg_stat_wal"
        ).fetchone()
    assert db is not None and wal is not None
    keys = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")
    out = dict(zip(keys, (int(v) for v in db), strict=True))
    wal_keys = ("wal_records", "wal_fpi", "wal_bytes", "wal_write", "wal_sync", "wal_sync_time_ms")
    out.update(zip(wal_keys, (float(v) for v in wal), strict=True))
    return out


def reset_statements(url: str) -> bool:
    """Reset pg_stat_statements; False if the server has it not (a server given by
    ACTORS_BENCH_POSTGRES without the library: the statement counts are left out)."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
    except psycopg.Error:
        return False
    return True


def statements(url: str, dbname: str) -> list[dict[str, Any]] | None:
    """pg_stat_statements of database ``dbname`` since the reset: calls and time per
    statement (``url``: the server's own database, where the extension is made);
    None without the extension."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT s.query, s.calls, s.total_exec_time, s.rows FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"
                " ORDER BY s.total_exec_time DESC",
                (dbname,),
            ).fetchall()
    except psycopg.Error:
        return None
    return [
        {"query": q, "calls": int(c), "exec_ms": round(float(t), 3), "rows": int(r)}
        for q, c, t, r in rows
    ]
