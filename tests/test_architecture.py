"""The package keeps its layering: the import-linter contracts of pyproject.toml hold.

``[tool.importlinter]`` in pyproject.toml lists the layers, high to low
(TYPE_CHECKING imports count), that only the store imports apsw and psycopg, and that
the base modules import nothing of the runtime. Each contract runs here
through ``lint-imports``; a broken one fails with import-linter's report,
which names every illegal import and its line.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Broken until the redesign of issue 17 lands in full; strict, so that the
# marker goes as soon as the contract holds.
KNOWN_BROKEN = {}


def lint_imports(contract: str) -> subprocess.CompletedProcess[str]:
    """Run one contract of pyproject.toml with import-linter, in this interpreter."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
            "--no-logo",
            "--contract",
            contract,
            str(ROOT / "pyproject.toml"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "contract",
    [
        pytest.param(
            name,
            marks=[pytest.mark.xfail(reason=KNOWN_BROKEN[name], strict=True)]
            if name in KNOWN_BROKEN
            else [],
        )
        for name in ("layers", "apsw", "psycopg", "base")
    ],
)
def test_import_contract_holds(contract: str) -> None:
    result = lint_imports(contract)
    if result.returncode != 0 or "Contracts: 1 kept, 0 broken." not in result.stdout:
        pytest.fail(f"import-linter:\n{result.stdout}{result.stderr}", pytrace=False)


LONGEST = 60  # lines of a function's body (its docstring not counted)


def _long_functions(package: Path) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            first = body[0]
            if (
                len(body) > 1
                and isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                first = body[1]
            lines = (node.end_lineno or node.lineno) - first.lineno + 1
            if lines > LONGEST:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_no_function_of_the_package_is_longer_than_a_screen() -> None:
    """A function that does not fit on a screen hides its decisions: split it."""
    assert _long_functions(ROOT / "actors") == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LONGEST + 1))
    (tmp_path / "long.py").write_text(f'def f():\n    """Doc."""\n{body}\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _long_functions(tmp_path) == [f"long.py:1 f: {LONGEST + 1} lines"]
    finally:
        ROOT = saved


# The one private call across objects: run_system is the System's constructor.
PRIVATE_READS_ALLOWED = {("actors/_run.py", "system._running")}


def _private_reads(package: Path) -> set[tuple[str, str]]:
    found = set()
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__"):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.add((str(path.relative_to(package.parent)), ast.unparse(node)))
    return found


def test_no_module_reads_another_objects_private_attributes() -> None:
    """Objects talk through their public methods and protocols (``ActorHost``, ``Store``)."""
    assert _private_reads(ROOT / "actors") == PRIVATE_READS_ALLOWED


def test_the_private_read_check_sees_one(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f(other):\n    return other._secret, self._ok\n")
    assert _private_reads(tmp_path / "pkg") == {("pkg/m.py", "other._secret")}


def test_the_package_does_not_need_psycopg_for_sqlite() -> None:
    """psycopg is the postgres extra's: importing actors, or running on SQLite, must not load it."""
    code = (
        "import sys, trio, actors\n"
        "async def h(ctx, msg): pass\n"
        "async def main():\n"
        "    async with actors.run_system(sys.argv[1], handler=h) as s:\n"
        "        await s.send('a', 1)\n"
        "        await s.drain()\n"
        "trio.run(main)\n"
        "assert 'psycopg' not in sys.modules, 'psycopg was imported'\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-c", code, f"{tmp}/a.db"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
