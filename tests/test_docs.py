"""The documentation tells the truth: its examples run, its reference is complete.

Every ```python block in README.md and docs/*.md is a whole script that calls
``trio.run(main)`` itself; each runs here in a fresh namespace, in a
temporary working directory, so ``"app.db"`` lands in ``tmp_path``. A block
whose first line is ``# not-run`` is a fragment and is skipped.

The doc tests are plain ``def`` tests on purpose: trio_mode only wraps
``async def`` tests, and the blocks start their own trio run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import actors
import actors.testing
from actors._demo import Report, count_dishonest, count_lost, count_out_of_order

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
SKIP_MARK = "# not-run"

README_DEMO = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/python -m actors demo"
README_TESTS = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
)


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block in ``path``, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def runnable_blocks() -> list[tuple[Path, int, str]]:
    """(file, index among its python blocks, code) of every block to run."""
    found = []
    for path in DOCS:
        blocks = [code for lang, code in code_blocks(path) if lang == "python"]
        for index, code in enumerate(blocks):
            if not code.lstrip().startswith(SKIP_MARK):
                found.append((path, index, code))
    return found


RUNNABLE = runnable_blocks()


@pytest.mark.parametrize(
    ("path", "index", "code"),
    [pytest.param(*block, id=f"{block[0].relative_to(ROOT)}#{block[1]}") for block in RUNNABLE],
)
def test_python_block_runs(
    path: Path, index: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"{path.relative_to(ROOT)}[python block {index}]", "exec")
    exec(compiled, {"__name__": "__main__"})


def test_every_doc_is_found_and_the_main_ones_have_examples() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    expected = {
        "README.md",
        "docs/index.md",
        "docs/tutorial.md",
        "docs/architecture.md",
        "docs/guarantees.md",
        "docs/lifecycle.md",
        "docs/seed-comparison.md",
        "docs/reference.md",
        "docs/howto-chaos-testing.md",
    }
    assert expected <= names
    runnable = {path.relative_to(ROOT).as_posix() for path, _, _ in RUNNABLE}
    assert {
        "README.md",
        "docs/tutorial.md",
        "docs/reference.md",
        "docs/howto-chaos-testing.md",
    } <= runnable


def test_fences_are_balanced() -> None:
    # An unclosed fence would hide the blocks after it from the tests above.
    for path in DOCS:
        fences = [line for line in path.read_text().splitlines() if line.startswith("```")]
        assert len(fences) % 2 == 0, f"{path.name} has an unclosed code fence"


def test_skipped_fragments_are_rare() -> None:
    skipped = [
        (path.name, code)
        for path in DOCS
        for lang, code in code_blocks(path)
        if lang == "python" and code.lstrip().startswith(SKIP_MARK)
    ]
    assert len(skipped) <= 2, skipped


def test_reference_names_every_public_name() -> None:
    text = (ROOT / "docs" / "reference.md").read_text()
    # Exactly the name in backticks, or its signature: `Actor` must not be
    # satisfied by `ActorKilledError`.
    missing = [name for name in actors.__all__ if not re.search(rf"`{name}[`(]", text)]
    assert not missing, f"docs/reference.md does not document {missing}"


def test_reference_names_every_public_name_of_actors_testing() -> None:
    text = (ROOT / "docs" / "reference.md").read_text()
    # In its own section, from its heading to the next top-level one.
    match = re.search(r"^## `actors\.testing`\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert match, "docs/reference.md has no section ## `actors.testing`"
    section = match.group(1)
    names = actors.testing.__all__
    missing = [name for name in names if not re.search(rf"`{name}[`(]", section)]
    assert not missing, f"docs/reference.md's actors.testing section does not document {missing}"
    # And every one of them has a docstring.
    undocumented = [n for n in names if not (getattr(actors.testing, n).__doc__ or "").strip()]
    assert not undocumented, undocumented


def test_the_chaos_how_to_is_linked_from_the_index() -> None:
    assert "(howto-chaos-testing.md)" in (ROOT / "docs" / "index.md").read_text()


def test_reference_lists_every_config_option_with_its_default() -> None:
    text = (ROOT / "docs" / "reference.md").read_text()
    text_lines = text.splitlines()
    for field in attrs.fields(actors.Config):
        assert f"`{field.name}`" in text, field.name
    # The simple defaults: the code's value, and how the table writes it.
    for name, value, written in [
        ("max_attempts", 4, "4"),
        ("handler_timeout", 300.0, "300.0"),
        ("idle_timeout", 60.0, "60.0"),
        ("max_active", 1000, "1000"),
        ("fair_share", 32, "32"),
        ("durability", "normal", '"normal"'),
        ("max_message_bytes", 1 << 20, "1048576"),
        ("shutdown_timeout", 10.0, "10.0"),
        ("mailbox_size", 256, "256"),
        ("busy_timeout", 5.0, "5.0"),
    ]:
        assert getattr(actors.Config(), name) == value, name
        row = next(line for line in text_lines if line.startswith(f"| `{name}`"))
        assert f"`{written}`" in row, row
    assert actors.Config().retry_backoff == actors.Backoff()
    assert actors.Config().restart_policy == actors.RestartPolicy()


def test_readme_gives_the_two_setup_commands_each_alone_in_a_block() -> None:
    blocks = [code.strip() for _, code in code_blocks(ROOT / "README.md")]
    assert README_DEMO in blocks
    assert README_TESTS in blocks


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    # pip's -q only quiets its output; everything else must be the same line.
    assert ci.replace(" install -q ", " install ") == README_TESTS


@pytest.mark.slow
def test_demo_runs_and_loses_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "actors",
            "demo",
            "--sessions",
            "20",
            "--messages",
            "10",
            "--duration",
            "0.5",
            "--seed",
            "7",
            "--db",
            str(tmp_path / "demo.db"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = dict(re.findall(r"^  ([a-z ]+?)\s{2,}(\d+)  ", result.stdout, re.MULTILINE))
    assert table["sent"] == "200"
    assert table["lost"] == "0"
    # Each id ended exactly one way: completed, or dead-lettered.
    assert int(table["processed"]) + int(table["dead"]) == 200
    for check in ("out of order", "overlapping", "dishonest attempts"):
        assert table[check] == "0", check
    assert (tmp_path / "demo.db").exists()  # --db is kept


def test_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "actors", "demo", "--sessions", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--sessions" in result.stderr


def test_demo_verdict_counts_what_is_missing() -> None:
    # The demo's checks must be able to fail, or its "lost 0" means nothing.
    assert count_lost([1, 2, 3, 4], completed={1, 2}, dead={4}) == 1
    assert count_lost([1, 2, 3], completed={1, 3}, dead={2}) == 0
    assert count_out_of_order({"a": [1, 1, 2, 5], "b": [3, 2, 4]}) == 1
    assert count_dishonest([1, 2, 3, 4], {1: [1, 2], 2: [2], 3: [1, 1], 4: []}) == 2
    report = Report(
        sent=4,
        processed=2,
        dead=1,
        failed_attempts=0,
        retried=0,
        kills=0,
        lost=1,
        out_of_order=0,
        overlapping=0,
        dishonest_attempts=0,
        seconds=0.0,
    )
    assert not report.ok
    assert re.search(r"^  lost\s+1  ", report.table(), re.MULTILINE)
    clean = attrs.evolve(report, lost=0)
    assert clean.ok
    assert not attrs.evolve(clean, overlapping=1).ok
