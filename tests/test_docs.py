"""The documentation tells the truth: its examples run, its reference is complete.

Every ```python block in README.md and docs/*.md is a whole script that calls
``trio.run(main)`` itself. Each runs here in this process, in a fresh
namespace, TWICE in the same temporary working directory (so ``"app.db"``
lands in ``tmp_path``, and an example that trips on what its last run left
fails), under a hang guard. After each run, nothing may have gone wrong
silently: no record logged at ERROR or above or with a traceback (a failed
attempt logs one at WARNING), no traceback printed, no warning, no dead
letter in any ``*.db`` the block left. A block that shows failures on
purpose says which with a line ``# expect: logged errors, dead letters``
(either or both); what it expects must then happen. A block whose first
line is ``# not-run`` is a fragment and is skipped.

The doc tests are plain ``def`` tests on purpose: trio_mode only wraps
``async def`` tests, and the blocks start their own trio run.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest
import trio

import actors
import actors.testing
from actors import _admin
from actors._demo import Report, count_dishonest, count_lost

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
SKIP_MARK = "# not-run"
EXPECT_MARK = re.compile(r"^[ \t]*# expect: (.*)$", re.MULTILINE)
EXPECTABLE = {"logged errors", "dead letters"}
# The slowest block takes about 1.5 s: a block still running after this is
# stuck (a blocking call waiting for a message a last run's key swallowed).
HANG_AFTER = 30.0

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


def expectations(code: str) -> set[str]:
    """What a block declares it shows on purpose (its ``# expect:`` lines)."""
    found = {item.strip() for m in EXPECT_MARK.finditer(code) for item in m.group(1).split(",")}
    unknown = found - EXPECTABLE
    assert not unknown, f"unknown '# expect:' items {sorted(unknown)}; known: {sorted(EXPECTABLE)}"
    return found


class BlockHung(BaseException):
    """A block ran past HANG_AFTER. A BaseException: the block's own
    ``except Exception`` must not swallow it."""


@contextmanager
def hang_guard(seconds: float, what: str) -> Iterator[None]:
    """Interrupt the main thread with BlockHung after ``seconds``.

    SIGALRM's handler runs in the main thread even while trio waits for I/O
    or for a worker thread that never returns (a blocking bridge call), and
    the exception ends ``trio.run``. The stuck worker thread is a daemon.
    """
    if not hasattr(signal, "setitimer"):  # (not on Windows: no guard there)
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        raise BlockHung(f"{what} still ran after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except BlockHung as exc:
        where = "".join(traceback.format_tb(exc.__traceback__))
        # The trio run it interrupted is a suspended generator that its
        # frames still hold, and until it is closed every later trio.run()
        # in this process raises "Attempted to call run() from inside a
        # run()": drop the frames' locals so that it closes now.
        traceback.clear_frames(exc.__traceback__)
        raise BlockHung(f"{exc}, in:\n{where}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def dead_letters_in(directory: Path) -> list[str]:
    """Every dead letter in the actors databases (``*.db``) under ``directory``."""
    found = []
    for db in sorted(directory.rglob("*.db")):
        try:
            views = _admin.open_readonly(str(db))
        except _admin.AdminError:
            continue  # not an actors database
        try:
            found += [
                f"{db.name}: {d.session_id!r}: {d.last_error.splitlines()[-1]}"
                for d in _admin.dead_letters(views)[0]
            ]
        finally:
            views.close()
    return found


def run_and_check(
    code: str,
    name: str,
    directory: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Run one block in ``directory`` (the cwd) and fail on what went wrong silently."""
    expected = expectations(code)
    caplog.clear()
    capsys.readouterr()
    compiled = compile(code, name, "exec")
    with hang_guard(HANG_AFTER, name), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")  # (a coroutine never awaited, a resource left open)
        exec(compiled, {"__name__": "__main__"})
    # A failed attempt is a WARNING, with its traceback: that too.
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR or "Traceback" in r.getMessage() or r.exc_info
    ]
    printed = capsys.readouterr()
    tracebacks = "Traceback (most recent call last)" in printed.out + printed.err
    dead = dead_letters_in(directory)
    if "logged errors" in expected:
        assert errors, f"{name} expects logged errors, and logged none"
    else:
        assert not errors, f"{name} logged errors: {errors}"
        assert not tracebacks, f"{name} printed a traceback:\n{printed.out}{printed.err}"
    assert not warned, f"{name} warned: {[str(w.message) for w in warned]}"
    if "dead letters" in expected:
        assert dead, f"{name} expects dead letters, and left none"
    else:
        assert not dead, f"{name} left dead letters: {dead}"


@pytest.fixture
def check(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> Callable[[str, str], None]:
    """``run_and_check(code, name)`` in ``tmp_path``, made the current directory."""
    monkeypatch.chdir(tmp_path)

    def check(code: str, name: str) -> None:
        run_and_check(code, name, tmp_path, caplog, capsys)

    return check


@pytest.mark.parametrize(
    ("path", "index", "code"),
    [pytest.param(*block, id=f"{block[0].relative_to(ROOT)}#{block[1]}") for block in RUNNABLE],
)
def test_python_block_runs_twice_in_one_directory(
    path: Path,
    index: int,
    code: str,
    check: Callable[[str, str], None],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if "DATABASE_URL" in code:
        # A cluster's example: its PostgreSQL database, a fresh one (conftest).
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("pg_url"))
    # Twice: a reader runs an example again, and it must not trip on the
    # database (or anything else) its last run left.
    for run in (1, 2):
        check(code, f"{path.relative_to(ROOT)}[python block {index}, run {run}]")


def test_the_doc_test_catches_what_goes_wrong_silently(
    tmp_path: Path, check: Callable[[str, str], None]
) -> None:
    poison = """
import trio

import actors


async def handle(ctx: actors.Context, msg: actors.Message) -> None:
    raise KeyError("add")


async def main() -> None:
    async with actors.run_system("x.db", handler=handle, max_attempts=1) as system:
        await system.send("alerts", {})
        await system.drain()


trio.run(main)
"""
    with pytest.raises(AssertionError, match="logged errors"):
        check(poison, "poison")
    marked = "# expect: logged errors\n" + poison
    with pytest.raises(AssertionError, match="left dead letters"):
        check(marked, "marked")
    check("# expect: logged errors, dead letters\n" + poison, "ok")
    for leftover in tmp_path.glob("x.db*"):  # the cases below start without dead letters
        leftover.unlink()
    # A stale marker fails too, and so does a typo in one.
    with pytest.raises(AssertionError, match="expects logged errors"):
        check("# expect: logged errors\nx = 1\n", "stale")
    with pytest.raises(AssertionError, match="unknown"):
        check("# expect: dead letter\nx = 1\n", "typo")
    warning = "import warnings\nwarnings.warn('deprecated', DeprecationWarning)\n"
    with pytest.raises(AssertionError, match="warned"):
        check(warning, "warning")
    printing = (
        "import traceback\ntry:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()\n"
    )
    with pytest.raises(AssertionError, match="printed a traceback"):
        check(printing, "printing")


# The interrupted run is abandoned, not finished, and trio says so.
@pytest.mark.filterwarnings("ignore:Trio guest run got abandoned:RuntimeWarning")
def test_the_hang_guard_ends_a_blocked_trio_run() -> None:
    # The way howto-effectively-once#5 hung on a second run: a worker thread
    # blocked for good, and trio waiting for it.
    never = threading.Event()

    async def main() -> None:
        await trio.to_thread.run_sync(never.wait)

    with pytest.raises(BlockHung, match="blocked still ran after"), hang_guard(0.2, "blocked"):
        trio.run(main)
    # And the next block can run trio again. (The worker thread stays
    # blocked, as a hung block's would: a daemon, it holds the abandoned run
    # whose collection would only print noise.)
    assert trio.run(trio.sleep, 0) is None


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
    # (Order and overlap are the Recorder's checks, which the demo reports.)
    recorder = actors.testing.Recorder()
    for session, message in [("a", 1), ("a", 2), ("b", 3), ("b", 2)]:
        recorder.record_start(session, message, 1)
        recorder.record_end(session, message, 1, "completed")
    assert len(recorder.violations().out_of_order) == 1
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
