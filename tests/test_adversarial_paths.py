"""Odd paths and operators' mistakes with the database file (issue 16).

- One system per database *file*, whatever name reaches it: a symbolic link,
  a hard link, a relative path, ``x/../app.db``; in this process and from
  another one. A second system through another name used to get a lock of
  its own, recover the first one's in-flight messages and run them again.
- The database file deleted or replaced while a system runs: the system
  stops with StoreError instead of acknowledging into a file that the next
  start will not open.
- The files a system leaves beside its database are ignored by git.
- The tutorial's steps run again, in the same directory, in any order.
"""

from __future__ import annotations

import fcntl
import fnmatch
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import pytest
import trio

import actors
from actors import _admin
from actors._lock import DatabaseLock

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 30.0  # seconds a child may take to start its system


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


# -- one system per file, in this process --------------------------------------


def symlink(target: Path, link: Path) -> None:
    link.symlink_to(target)


def hard_link(target: Path, link: Path) -> None:
    os.link(target, link)


OTHER_NAMES: dict[str, Callable[[Path, Path], None]] = {
    "symlink": symlink,
    "hard link": hard_link,
}


@pytest.mark.parametrize("make_name", OTHER_NAMES.values(), ids=OTHER_NAMES.keys())
async def test_a_second_system_through_another_name_is_refused(
    tmp_path: Path, make_name: Callable[[Path, Path], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    other = tmp_path / "other.db"
    started = trio.Event()
    release = trio.Event()
    calls: list[tuple[str, object]] = []

    async def first(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append(("first", msg.body))
        started.set()
        await release.wait()

    async def second(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append(("second", msg.body))

    async with actors.run_system(db, handler=first) as system:
        await system.send("s", "in flight")
        await started.wait()
        make_name(db, other)
        # Refused without opening the file: closing a descriptor of it would
        # drop the running system's SQLite locks (POSIX locks are per process).
        opened: list[str] = []
        real_open = os.open

        def spy(path: str, *args: int, **kwargs: int) -> int:
            opened.append(os.fspath(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", spy)
        with pytest.raises(actors.DatabaseInUseError) as info:
            async with actors.run_system(other, handler=second):
                pass  # pragma: no cover - the bug: it started, and ran the message again
        monkeypatch.undo()
        assert opened == []
        assert f"pid {os.getpid()} " in info.value.owner
        assert "in this process" in info.value.owner
        assert info.value.path == str(other)
        release.set()
        await system.drain()
    assert calls == [("first", "in flight")]

    # Stopped: the other name opens the same database (for a hard link the
    # side files go by that name; see the warning test below).
    async with actors.run_system(other, handler=second) as system:
        assert system.statistics().pending == 0
        await system.send("s", "second")
        await system.drain()
    assert calls[-1] == ("second", "second")


async def test_the_real_path_is_refused_while_a_symlink_holds_the_file(tmp_path: Path) -> None:
    db = tmp_path / "data" / "app.db"
    db.parent.mkdir()
    (tmp_path / "link").symlink_to(db.parent)  # a link to the directory
    async with actors.run_system(tmp_path / "link" / "app.db", handler=noop):
        for name in (db, tmp_path / "link" / "app.db"):
            with pytest.raises(actors.DatabaseInUseError):
                async with actors.run_system(name, handler=noop):
                    pass  # pragma: no cover
    # One set of side files, by the resolved name.
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith("app.db.")) == [
        "app.db.lock",
        "app.db.starts",
    ]
    assert [name for name in os.listdir(tmp_path) if name.endswith(".lock")] == []


async def test_relative_absolute_and_dotdot_names_are_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    async with actors.run_system("app.db", handler=noop) as system:
        assert system.path == str(tmp_path / "app.db")
        for name in (str(tmp_path / "app.db"), "./app.db", "./x/../app.db", "x/../app.db"):
            with pytest.raises(actors.DatabaseInUseError):
                async with actors.run_system(name, handler=noop):
                    pass  # pragma: no cover
            assert _admin.is_running(name)
    assert not _admin.is_running("./x/../app.db")


async def test_dotdot_after_a_symlink_is_the_file_the_system_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "link/../app.db", where link points into far/deep, is far/app.db to the
    # kernel (and to SQLite): not the app.db beside the link, which a
    # textual normalisation (os.path.abspath) made of it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "far" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "far" / "deep")
    async with actors.run_system("app.db", handler=noop) as here:
        await here.send("s", "here")
        await here.drain()
        # Another file: not in use, and it must be the one the name leads to.
        async with actors.run_system("link/../app.db", handler=noop) as there:
            assert there.statistics().processed == 0 and there.statistics().pending == 0
            await there.send("s", "there")
            await there.drain()
            assert _admin.is_running("link/../app.db")
    assert (tmp_path / "far" / "app.db.lock").exists()
    assert (tmp_path / "far" / "app.db.starts").exists()
    async with actors.run_system(tmp_path / "far" / "app.db", handler=noop) as there:
        assert there.statistics().processed == 0  # (counts since start)
        assert there.dead_letters() == []
    assert _admin.is_running("link/../app.db") is False


async def test_dotdot_after_a_missing_directory_is_refused_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # To the kernel "missing/../app.db" leads nowhere; os.path.realpath (and
    # os.path.abspath) make it "app.db" as text. The refusal must not leave
    # an app.db (or its lock file) that the name never named.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(actors.StoreError, match="cannot open database"):
        async with actors.run_system("missing/../app.db", handler=noop):
            pass  # pragma: no cover
    assert os.listdir(tmp_path) == []


async def test_a_hard_linked_database_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "app.db"
    async with actors.run_system(db, handler=noop):
        pass
    os.link(db, tmp_path / "backup.db")
    with caplog.at_level(logging.WARNING, logger="actors"):
        async with actors.run_system(db, handler=noop):
            pass
    assert any("has 2 names (hard links)" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


def test_the_command_lines_lock_file_is_the_systems(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    (tmp_path / "link.db").symlink_to(db)
    lock = DatabaseLock(str(tmp_path / "link.db"))
    lock.acquire()
    try:
        assert _admin.lock_path(str(tmp_path / "link.db")) == lock.path == f"{db}.lock"
        assert _admin.lock_path(str(db)) == lock.path
        # And the start table, which status reads to tell handed from in flight.
        assert _admin.starts_path(str(tmp_path / "link.db")) == f"{db}.starts"
        assert _admin.is_running(str(db)) and _admin.is_running(str(tmp_path / "link.db"))
    finally:
        lock.release()
    assert not _admin.is_running(str(db))


def open_files(under: Path) -> list[str]:
    """Files under ``under`` that this process has open (Linux's /proc)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed meanwhile
            continue
        if target.startswith(str(under)):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_system_of_an_earlier_version_holding_only_the_sidecar_is_respected(
    tmp_path: Path,
) -> None:
    # Earlier versions locked only <path>.lock (flock), and wrote their owner there.
    db = tmp_path / "app.db"
    db.touch()  # (an empty file is a new database)
    fd = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"pid 1 on old-host, started yesterday")
        lock = DatabaseLock(str(tmp_path / "." / "app.db"))
        with pytest.raises(actors.DatabaseInUseError) as info:
            lock.acquire()
        assert info.value.owner == "pid 1 on old-host, started yesterday"
        assert _admin.is_running(str(db))
        # Refused at the sidecar: the database was not even opened.
        assert open_files(tmp_path) == [f"{db}.lock"]
    finally:
        os.close(fd)
    lock.acquire()
    assert sorted(open_files(tmp_path)) == [str(db), f"{db}.lock"]
    lock.release()
    assert open_files(tmp_path) == []
    assert not _admin.is_running(str(db))


# -- one system per file, across processes ---------------------------------------

HOLD = """
import sys, trio, actors

async def handle(ctx, msg):
    print("ready", flush=True)  # its start is marked: a crash now charges the attempt
    await trio.sleep_forever()  # keeps the message in flight

async def main():
    async with actors.run_system(sys.argv[1], handler=handle, shutdown_timeout=0.01) as system:
        await system.send("s", "in flight")
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes it

trio.run(main)
"""


@contextmanager
def holding(db: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process running a system on ``db``, a message in flight, until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"  # (blocks until the child says it)
        yield proc
    finally:
        proc.kill()  # a dead process: its in-flight message must come back once
        proc.wait(CHILD_TIMEOUT)


@pytest.mark.parametrize("make_name", OTHER_NAMES.values(), ids=OTHER_NAMES.keys())
def test_another_process_through_another_name_is_refused(
    tmp_path: Path, make_name: Callable[[Path, Path], None]
) -> None:
    db = tmp_path / "app.db"
    other = tmp_path / "elsewhere" / "other.db"
    other.parent.mkdir()
    handled: list[tuple[object, int]] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append((msg.body, msg.attempt))

    async def start_and_drain(path: Path) -> None:
        async with actors.run_system(path, handler=handle) as system:
            await system.drain()

    with holding(db) as child:
        make_name(db, other)
        with pytest.raises(actors.DatabaseInUseError) as info:
            trio.run(start_and_drain, other)
        if make_name is symlink:
            assert f"pid {child.pid} " in info.value.owner  # the sidecar is the same
        else:
            assert "another name" in info.value.owner
        assert handled == []  # nothing recovered from under the running child
        assert _admin.is_running(str(other)) and _admin.is_running(str(db))
    # The child died: the message it had in flight runs here, once.
    assert not _admin.is_running(str(other))
    trio.run(start_and_drain, db)
    assert handled == [("in flight", 2)]


def my_sqlite_locks(db: Path) -> list[str]:
    """The POSIX locks this process holds on ``db`` (Linux's /proc/locks)."""
    device, inode = os.stat(db).st_dev, os.stat(db).st_ino
    key = f"{os.major(device):02x}:{os.minor(device):02x}:{inode} "
    return [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/locks").read_text().splitlines()
        if " POSIX " in line and f" {os.getpid()} " in line and key in line
    ]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks")
@pytest.mark.parametrize("make_name", OTHER_NAMES.values(), ids=OTHER_NAMES.keys())
def test_polling_for_the_lock_keeps_the_callers_sqlite_locks(
    tmp_path: Path, make_name: Callable[[Path, Path], None]
) -> None:
    # The command line waits for a running system's answer with a connection
    # open, and asks for the lock at every poll (to notice that the system
    # stopped). A refusal that opened and closed the database would drop
    # that connection's SQLite locks (POSIX locks belong to the process):
    # then another process's last connection could checkpoint and delete the
    # WAL under it.
    db = tmp_path / "app.db"
    other = tmp_path / "elsewhere" / "other.db"
    other.parent.mkdir()
    with holding(db):
        make_name(db, other)
        conn = apsw.Connection(str(other))
        lock = DatabaseLock(str(other))
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
            held = my_sqlite_locks(db)
            assert held, "a connection in WAL mode holds a shared lock while open"
            for _ in range(3):
                with pytest.raises(actors.DatabaseInUseError):
                    lock.acquire()
                assert my_sqlite_locks(db) == held
        finally:
            conn.close()
            lock.release()  # (after the connection: it closes the database's descriptor)


# -- the file deleted or replaced while the system runs ---------------------------


def delete(db: Path) -> None:
    db.unlink()


def rename_away(db: Path) -> None:
    db.rename(db.with_name("moved.db"))


def replace_with_a_copy(db: Path) -> None:
    # A copy holds the same messages, but it is another file: what the
    # running system writes from now on would not be in it.
    copy = db.with_name("copy.db")
    shutil.copyfile(db, copy)
    os.replace(copy, db)


def repoint_the_link(db: Path) -> None:
    link = db.with_name("link.db")
    fresh = db.with_name("fresh.db")
    fresh.touch()
    link.unlink()
    link.symlink_to(fresh)


MISHAPS: dict[str, Callable[[Path], None]] = {
    "deleted": delete,
    "renamed away": rename_away,
    "replaced": replace_with_a_copy,
    "symlink repointed": repoint_the_link,
}


@pytest.mark.parametrize("mishap", MISHAPS.values(), ids=MISHAPS.keys())
async def test_a_database_file_deleted_or_replaced_stops_the_system(
    tmp_path: Path, clock: object, mishap: Callable[[Path], None]
) -> None:
    db = tmp_path / "app.db"
    name = db
    if mishap is repoint_the_link:
        name = tmp_path / "link.db"
        name.symlink_to(db)
    handled: list[object] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append(msg.body)

    with pytest.raises(actors.StoreError, match="while the system ran") as info:
        async with actors.run_system(name, handler=handle, status_interval=0.05) as system:
            await system.send("s", "before")
            await system.drain()
            mishap(db)
            await system.send("s", "after")  # acknowledged, into the file now lost
            with trio.fail_after(10):  # the bug: it went on like that, forever
                await trio.sleep_forever()
    assert handled[0] == "before"
    assert str(name) in str(info.value)


async def test_the_file_check_leaves_a_healthy_system_alone(
    tmp_path: Path, autojump_clock: object
) -> None:
    db = tmp_path / "app.db"
    async with actors.run_system(db, handler=noop, status_interval=0.05) as system:
        beats = system._health.statistics().heartbeats
        await trio.sleep(0.5)  # (virtual) ten beats, each after its check
        assert system._health.statistics().heartbeats >= beats + 5
        health = await system.health()
        assert health.healthy


# -- side files and git ------------------------------------------------------------


def ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


async def test_gitignore_covers_every_file_a_system_leaves(tmp_path: Path) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "/" not in line.strip()
    ]
    left: set[str] = set()
    stopped = trio.Event()

    async def handle(ctx: actors.Context, msg: actors.Message) -> None:
        left.update(os.listdir(tmp_path))  # while it runs: -wal and -shm too
        stopped.set()

    async with actors.run_system(tmp_path / "app.db", handler=handle) as system:
        await system.send("s", 1)
        await stopped.wait()
    left.update(os.listdir(tmp_path))
    assert {"app.db", "app.db-wal", "app.db-shm", "app.db.lock", "app.db.starts"} <= left
    assert [name for name in sorted(left) if not ignored(name, patterns)] == []


# -- the tutorial, again and again -------------------------------------------------

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def tutorial_steps() -> list[str]:
    text = (ROOT / "docs" / "tutorial.md").read_text()
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1) == "python"]


def test_the_tutorial_runs_twice_in_one_directory_in_any_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = tutorial_steps()
    assert len(steps) >= 6
    monkeypatch.chdir(tmp_path)
    order = [*range(len(steps)), *range(len(steps)), *reversed(range(len(steps)))]
    for index in order:
        code = compile(steps[index], f"docs/tutorial.md[python block {index}]", "exec")
        exec(code, {"__name__": "__main__"})
    # Each step keeps its own database: no step reads what another left.
    databases = sorted(p.name for p in tmp_path.glob("*.db"))
    assert len(databases) == len(steps), databases
