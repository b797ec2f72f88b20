"""The store boundary: the SQLite store implements the protocols, and no SQL is above it.

The runtime and the command line are written against the protocols of
``actors/store/protocol.py``; a second backend, or a fake store for unit
tests, implements the same. These tests keep the SQLite implementation and
the protocols in step (every member, with the same parameters), and keep
the boundary where it is: no SQL statement and no apsw import outside
``actors/store/``, and none in the committer, which knows no backend.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from memstore import MemoryStartMarks, MemoryStore

from actors.store import protocol
from actors.store.postgres_views import PgControl, PgViews
from actors.store.sqlite import SqliteStore
from actors.store.sqlite_views import SqliteControlRequests, SqliteViews
from actors.store.starts import StartTable

PACKAGE = Path(__file__).resolve().parent.parent / "actors"
STORE = PACKAGE / "store"

# The demo keeps a ledger of its own, in a small SQLite file beside the
# database (not the actors database): what a killed run acknowledged and
# completed, checked by the next run.
OWN_DATABASES = {PACKAGE / "_demo.py": "Ledger"}

IMPLEMENTATIONS = [
    pytest.param(protocol.Store, SqliteStore, id="Store"),
    pytest.param(protocol.StoreViews, SqliteViews, id="StoreViews"),
    pytest.param(protocol.ControlRequests, SqliteControlRequests, id="ControlRequests"),
    pytest.param(protocol.StartMarks, StartTable, id="StartMarks"),
    pytest.param(protocol.StoreViews, PgViews, id="PgViews"),
    pytest.param(protocol.ControlRequests, PgControl, id="PgControl"),
    # The fake store of the unit tests (tests/memstore.py) keeps the same boundary.
    pytest.param(protocol.Store, MemoryStore, id="MemoryStore"),
    pytest.param(protocol.StartMarks, MemoryStartMarks, id="MemoryStartMarks"),
]


def members(proto: type) -> dict[str, object]:
    """The protocol's own members: methods and properties, by name."""
    return {
        name: value
        for name, value in vars(proto).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }


@pytest.mark.parametrize(("proto", "impl"), IMPLEMENTATIONS)
def test_the_implementation_has_every_member_of_the_protocol(proto: type, impl: type) -> None:
    missing = [name for name in members(proto) if not hasattr(impl, name)]
    assert not missing, f"{impl.__name__} lacks {missing}"
    for name, value in members(proto).items():
        if isinstance(value, property):
            assert isinstance(inspect.getattr_static(impl, name), property), name


@pytest.mark.parametrize(("proto", "impl"), IMPLEMENTATIONS)
def test_every_method_takes_the_same_parameters(proto: type, impl: type) -> None:
    for name, value in members(proto).items():
        if isinstance(value, property):
            continue
        want = inspect.signature(value)  # type: ignore[arg-type]
        got = inspect.signature(getattr(impl, name))
        assert list(got.parameters.values()) == list(want.parameters.values()), (
            f"{impl.__name__}.{name}{got} is not {proto.__name__}.{name}{want}"
        )


@pytest.mark.parametrize(("proto", "impl"), IMPLEMENTATIONS)
def test_every_method_returns_what_the_protocol_says(proto: type, impl: type) -> None:
    """An ``async def`` of the protocol may be a coroutine function, or a
    function that returns the committer's coroutine of the same result (so
    that a waiting task resumes through no frame of the store's)."""
    for name, value in members(proto).items():
        if isinstance(value, property):
            continue
        want = inspect.signature(value).return_annotation  # type: ignore[arg-type]
        method = getattr(impl, name)
        got = inspect.signature(method).return_annotation
        if inspect.iscoroutinefunction(value) and not inspect.iscoroutinefunction(method):
            assert got == f"Coroutine[Any, Any, {want}]", f"{name}: {got} for async {want}"
        elif want.startswith("AbstractContextManager[") and hasattr(method, "__wrapped__"):
            # A @contextmanager generator.
            assert got == want.replace("AbstractContextManager", "Iterator"), name
        else:
            assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(value), name
            assert got == want, f"{name}: {got} is not {want}"


@pytest.mark.parametrize("proto", sorted({p.values[0] for p in IMPLEMENTATIONS}, key=str))
def test_every_member_of_the_protocol_states_its_contract(proto: type) -> None:
    undocumented = [name for name, value in members(proto).items() if not inspect.getdoc(value)]
    assert not undocumented, f"{proto.__name__}: no docstring for {undocumented}"


# -- the boundary ------------------------------------------------------------------

SQL = re.compile(
    r"\b(SELECT\b.*\bFROM|INSERT (OR \w+ )?INTO|UPDATE \w+ SET|DELETE FROM|PRAGMA \w+"
    r"|BEGIN( IMMEDIATE)?$|COMMIT$|ROLLBACK$|CREATE (TABLE|INDEX)|ALTER TABLE)",
    re.DOTALL,
)


def modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def outside_the_store() -> list[Path]:
    return [p for p in modules(PACKAGE) if STORE not in p.parents]


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes (prose, not statements)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def exempt_nodes(tree: ast.AST, path: Path) -> set[int]:
    """The nodes inside the class that keeps a database of its own, if any."""
    name = OWN_DATABASES.get(path)
    return {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == name
        for inner in ast.walk(node)
    }


def sql_in(path: Path) -> list[str]:
    """Every string literal of ``path`` that holds SQL (docstrings aside)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = docstrings(tree) | exempt_nodes(tree, path)
    return [
        f"{path.name}:{node.lineno}: {node.value.strip()[:60]!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in skip
        and SQL.search(node.value.strip())
    ]


def apsw_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(n == "apsw" or n.startswith("apsw.") for n in names):
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_the_sql_detector_sees_the_store_statements() -> None:
    """(So that the tests below would see a statement that strayed.)"""
    found = [hit for p in modules(STORE) for hit in sql_in(p)]
    for statement in ("SELECT", "INSERT", "UPDATE", "DELETE", "PRAGMA", "BEGIN", "CREATE"):
        assert any(statement in hit for hit in found), statement


def test_no_sql_outside_the_store() -> None:
    found = [hit for path in outside_the_store() for hit in sql_in(path)]
    assert not found, "SQL above the store:\n" + "\n".join(found)


def test_no_apsw_outside_the_store() -> None:
    found = [
        hit
        for path in outside_the_store()
        if path not in OWN_DATABASES
        for hit in apsw_imports(path)
    ]
    assert not found, "apsw imported above the store: " + ", ".join(found)


def test_the_committer_knows_no_backend() -> None:
    committer = STORE / "committer.py"
    assert not sql_in(committer)
    assert not apsw_imports(committer)
    text = committer.read_text()
    assert "sqlite" not in re.sub(r'""".*?"""|#.*', "", text, flags=re.DOTALL).lower()
