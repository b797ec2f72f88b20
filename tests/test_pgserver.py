"""The PostgreSQL test fixtures (conftest.py: pg_server, pg_url) and tests/pgserver.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pgserver
import pytest
from pgserver import Existing, Throwaway, Unavailable

if TYPE_CHECKING:
    import psycopg

ROOT = Path(__file__).resolve().parent.parent

# Names of databases pg_url gave to earlier tests of this module.
GIVEN: list[str] = []


def connect(url: str) -> psycopg.Connection[Any]:
    # Imported here: without psycopg the fixtures skip these tests, and the
    # decision tests below still run.
    import psycopg

    return psycopg.connect(url, autocommit=True)


def dbname(url: str) -> str:
    with connect(url) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def tables(url: str) -> list[str]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return [row[0] for row in rows]


def exists(server_url: str, name: str) -> bool:
    with connect(server_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [name]).fetchone()
    assert row is not None
    return bool(row[0])


# -- the fixtures --------------------------------------------------------------


def test_the_database_connects_and_is_empty(pg_url: str, pg_server: str) -> None:
    name = dbname(pg_url)
    assert name.startswith("actors_test_")
    assert exists(pg_server, name)
    assert tables(pg_url) == []
    GIVEN.append(name)


def test_the_server_url_is_the_postgres_database(pg_server: str) -> None:
    if not os.environ.get("ACTORS_TEST_POSTGRES"):
        assert pg_server.startswith("postgresql://postgres@127.0.0.1:")
        assert dbname(pg_server) == "postgres"


def test_two_databases_are_different_and_a_table_in_one_is_not_in_the_other(
    pg_url: str, pg_server: str
) -> None:
    GIVEN.append(dbname(pg_url))
    with pgserver.fresh_database(pg_server) as other:
        assert dbname(other) != dbname(pg_url)
        assert tables(other) == []
        with connect(pg_url) as conn:
            conn.execute("CREATE TABLE t (x int)")
        assert tables(pg_url) == ["public.t"]
        assert tables(other) == []


def test_the_databases_of_earlier_tests_are_dropped(pg_server: str) -> None:
    if not GIVEN:
        pytest.skip("runs after the tests above (run the whole module)")
    assert len(set(GIVEN)) == len(GIVEN), GIVEN
    for name in GIVEN:
        assert not exists(pg_server, name), name


def test_the_database_is_dropped_with_connections_still_open(pg_server: str) -> None:
    with pgserver.fresh_database(pg_server) as url:
        name = dbname(url)
        left_open = connect(url)  # a test that forgot to close
    with left_open:
        assert not exists(pg_server, name)
        with pytest.raises(pytest.importorskip("psycopg").OperationalError):
            left_open.execute("SELECT 1")


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (
            "postgresql://u@h:5432/postgres?sslmode=disable",
            "postgresql://u@h:5432/x?sslmode=disable",
        ),
        ("postgresql://u@h", "postgresql://u@h/x"),
    ],
)
def test_database_url_names_the_database(server: str, expected: str) -> None:
    assert pgserver.database_url(server, "x") == expected


def test_a_key_value_server_gives_a_key_value_database() -> None:
    conninfo = pytest.importorskip("psycopg.conninfo")
    given = pgserver.database_url("host=h user=u dbname=postgres", "x")
    assert conninfo.conninfo_to_dict(given) == {"host": "h", "user": "u", "dbname": "x"}


def test_postgres_users_are_marked(request: pytest.FixtureRequest, pg_server: str) -> None:
    assert request.node.get_closest_marker("postgres") is not None


def test_others_are_not_marked(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("postgres") is None


# -- which server: the decision ------------------------------------------------

BIN = Path("/opt/pg/bin")


def test_no_binaries_and_no_ci_skips_with_the_hint() -> None:
    plan = pgserver.plan_server({}, None, have_psycopg=True)
    assert plan == Unavailable(pgserver.HINT, fatal=False)
    assert "\n" not in plan.reason
    assert "install postgresql-15" in plan.reason
    assert "ACTORS_TEST_POSTGRES=postgresql://" in plan.reason


def test_an_empty_ci_is_no_ci() -> None:
    plan = pgserver.plan_server({"CI": ""}, None, have_psycopg=True)
    assert plan == Unavailable(pgserver.HINT, fatal=False)


def test_no_binaries_on_ci_is_an_error() -> None:
    plan = pgserver.plan_server({"CI": "true"}, None, have_psycopg=True)
    assert isinstance(plan, Unavailable)
    assert plan.fatal
    assert plan.reason.startswith(pgserver.HINT)
    assert "CI" in plan.reason
    assert "\n" not in plan.reason


def test_a_bad_bindir_is_named_in_the_reason() -> None:
    plan = pgserver.plan_server({"ACTORS_PG_BINDIR": "/nonexistent"}, None, have_psycopg=True)
    assert isinstance(plan, Unavailable)
    assert not plan.fatal
    assert "ACTORS_PG_BINDIR=/nonexistent" in plan.reason
    assert "\n" not in plan.reason


def test_binaries_start_a_throwaway_server() -> None:
    assert pgserver.plan_server({}, BIN, have_psycopg=True) == Throwaway(BIN)
    assert pgserver.plan_server({"CI": "1"}, BIN, have_psycopg=True) == Throwaway(BIN)


def test_an_existing_server_comes_first() -> None:
    url = "postgresql://me@db:5433/postgres"
    env = {"ACTORS_TEST_POSTGRES": url}
    assert pgserver.plan_server(env, BIN, have_psycopg=True) == Existing(url)
    assert pgserver.plan_server(env, None, have_psycopg=True) == Existing(url)
    assert pgserver.plan_server({**env, "CI": "true"}, None, have_psycopg=True) == Existing(url)


def test_no_psycopg_skips_or_on_ci_fails() -> None:
    plan = pgserver.plan_server({}, BIN, have_psycopg=False)
    assert isinstance(plan, Unavailable)
    assert not plan.fatal
    assert "psycopg" in plan.reason
    plan = pgserver.plan_server({"CI": "true"}, BIN, have_psycopg=False)
    assert isinstance(plan, Unavailable)
    assert plan.fatal


# -- which server: the binaries ------------------------------------------------


def test_a_bindir_without_the_binaries_is_none() -> None:
    assert pgserver.find_bindir({"ACTORS_PG_BINDIR": "/nonexistent"}) is None


def test_a_given_bindir_with_the_binaries_is_it(tmp_path: Path) -> None:
    for name in ("initdb", "pg_ctl"):
        (tmp_path / name).touch(mode=0o755)
    assert pgserver.find_bindir({"ACTORS_PG_BINDIR": str(tmp_path)}) == tmp_path


def test_a_given_bindir_needs_both_binaries(tmp_path: Path) -> None:
    (tmp_path / "initdb").touch(mode=0o755)
    assert pgserver.find_bindir({"ACTORS_PG_BINDIR": str(tmp_path)}) is None


@pytest.mark.slow
def test_a_port_taken_before_the_server_binds_it_is_retried(
    pg_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pg_server: only where this machine can start servers at all.
    bindir = pgserver.find_bindir(os.environ)
    if bindir is None:
        pytest.skip("needs the PostgreSQL binaries, not only a server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], pgserver.free_port()])
        monkeypatch.setattr(pgserver, "free_port", lambda: next(ports))
        with pgserver.throwaway_server(bindir) as url:
            assert dbname(url) == "postgres"
        assert next(ports, None) is None


# -- the whole way, in a pytest of its own -------------------------------------


def run_pytest(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "ACTORS_TEST_POSTGRES")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
         "tests/test_pgserver.py::test_the_server_url_is_the_postgres_database"],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_without_a_server_the_tests_skip_with_one_line_or_on_ci_fail() -> None:
    skipped = run_pytest(ACTORS_PG_BINDIR="/nonexistent", CI="")
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout, skipped.stdout
    assert pgserver.HINT in skipped.stdout, skipped.stdout
    failed = run_pytest(ACTORS_PG_BINDIR="/nonexistent", CI="true")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 error" in failed.stdout, failed.stdout
    assert "CI is set" in failed.stdout, failed.stdout
