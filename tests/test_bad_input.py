"""The bad-input table: every misuse of actors we know of, one test per row.

Each row gets a clear error (or the documented outcome), and loses nothing:
no acknowledged message, and no byte of a file that is not ours to change.
The rows, by what goes wrong:

- BAD_BODIES: bodies ``send()`` cannot encode (TypeError).
- BODY_SIZES: bodies over, at and under ``max_message_bytes``.
- BAD_SESSION_IDS / ODD_SESSION_IDS: session ids refused, and strange ones
  that are fine.
- BAD_DELAYS: ``send(delay=...)`` values refused.
- BAD_SETUP: handlers, options and paths ``run_system`` refuses before it
  touches the file.
- RETURNS: handlers that return a value (ignored: the message is
  processed).
- BASE_EXCEPTIONS: handlers that raise a BaseException that is not an
  Exception (it stops the system; the message stays pending).
- Handlers that block the event loop (nothing is lost; a timeout can
  interrupt them only at their next checkpoint).
- BAD_FILES and the tests after it: database files that are not usable
  (StoreError and friends), read-only, empty, or in use.

Some rows repeat tests of test_send.py and test_lifecycle.py on purpose: this
file is the complete list. ``ROWS`` is the number of inputs tried (run with
``-s`` to see it).
"""

from __future__ import annotations

import datetime
import decimal
import math
import os
import random
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw
import helpers
import pytest
import trio
import trio.testing
from faultvfs import FaultVFS
from helpers import drain

import actors


def rows(
    path: str, sql: str = "SELECT body, state, attempts FROM messages ORDER BY id"
) -> list[Any]:
    return helpers.rows(path, sql)


class Recorder:
    """A handler that records (session, body, attempt) of each message it finished."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, int]] = []

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.seen.append((ctx.session_id, msg.body, msg.attempt))

    @property
    def bodies(self) -> list[Any]:
        return [b for _, b, _ in self.seen]


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    print(f"\nbad inputs tried: {ROWS}")


# -- bodies ---------------------------------------------------------------------


class Unencodable:
    pass


def cyclic_list() -> list[Any]:
    cycle: list[Any] = []
    cycle.append(cycle)
    return cycle


def cyclic_dict() -> dict[str, Any]:
    cycle: dict[str, Any] = {}
    cycle["self"] = {"again": cycle}
    return cycle


def deeply_nested(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


BAD_BODIES = [
    pytest.param(object(), id="object"),
    pytest.param(Unencodable(), id="instance-of-a-class"),
    pytest.param({1, 2}, id="set"),
    pytest.param(frozenset({"a"}), id="frozenset"),
    pytest.param({"a": {1, 2}}, id="set-inside-dict"),
    pytest.param(math.nan, id="nan"),
    pytest.param({"x": math.inf}, id="infinity-inside-dict"),
    pytest.param([-math.inf], id="minus-infinity-inside-list"),
    pytest.param("\ud800", id="lone-surrogate"),
    pytest.param({"\udc80": 1}, id="lone-surrogate-as-key"),
    pytest.param(["ok", "\udfff"], id="lone-surrogate-inside-list"),
    pytest.param(cyclic_list(), id="cyclic-list"),
    pytest.param(cyclic_dict(), id="cyclic-dict"),
    pytest.param(deeply_nested(100_000), id="nested-100000-deep"),
    pytest.param({(1, 2): "value"}, id="tuple-as-key"),
    pytest.param({"raw": b"bytes"}, id="bytes-inside-json"),
    pytest.param(decimal.Decimal("1.5"), id="decimal"),
    pytest.param(datetime.datetime(2024, 1, 1), id="datetime"),
    pytest.param(range(3), id="range"),
    pytest.param(len, id="function"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_bad_body(db_path: str, autojump_clock: object, body: object) -> None:
    """TypeError from send() and send_many(); nothing persisted; neighbours unharmed."""
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", "before")
        with pytest.raises(TypeError, match=r"not JSON-compatible|not valid Unicode"):
            await system.send("s", body)
        with pytest.raises(TypeError, match="item 1"):
            await system.send_many([("s", "in-the-same-batch"), ("s", body)])
        await system.send("s", "after")
        await drain(system)
        assert system.statistics().sends == 2
    assert handler.bodies == ["before", "after"]
    assert rows(db_path) == []


# -- body sizes -------------------------------------------------------------------

MIB = 1 << 20

# (max_message_bytes or None for the default, body, accepted)
BODY_SIZES = [
    pytest.param(100, b"x" * 100, True, id="bytes-exactly-at-limit"),
    pytest.param(100, b"x" * 101, False, id="bytes-one-over-limit"),
    pytest.param(100, "x" * 98, True, id="json-exactly-at-limit"),  # 98 + 2 quotes
    pytest.param(100, "x" * 99, False, id="json-one-over-limit"),
    pytest.param(100, "é" * 49, True, id="utf8-exactly-at-limit"),  # 98 bytes + 2
    pytest.param(100, "é" * 50, False, id="utf8-over-limit-in-bytes-not-chars"),
    pytest.param(100, {"k": "v" * 92}, True, id="object-exactly-at-limit"),  # {"k":"..."}
    pytest.param(100, {"k": "v" * 93}, False, id="object-one-over-limit"),
    pytest.param(None, b"x" * MIB, True, id="default-limit-exactly"),
    pytest.param(None, b"x" * (MIB + 1), False, id="default-limit-one-over"),
    pytest.param(None, "x" * (4 * MIB), False, id="huge-4-mib"),
    pytest.param(1, b"", True, id="empty-bytes"),
    pytest.param(2, "", True, id="empty-string"),
    pytest.param(4, None, True, id="null"),
]


@pytest.mark.parametrize(("limit", "body", "accepted"), BODY_SIZES)
async def test_body_size(
    db_path: str, autojump_clock: object, limit: int | None, body: Any, accepted: bool
) -> None:
    handler = Recorder()
    options = {} if limit is None else {"max_message_bytes": limit}
    async with actors.run_system(db_path, handler=handler, **options) as system:
        if accepted:
            await system.send("s", body)
        else:
            with pytest.raises(actors.MessageTooLargeError, match="max_message_bytes") as error:
                await system.send("s", body)
            assert isinstance(error.value, ValueError)
        await drain(system)
    assert handler.bodies == ([body] if accepted else [])
    assert rows(db_path) == []


# -- session ids ------------------------------------------------------------------

BAD_SESSION_IDS = [
    pytest.param("", ValueError, id="empty"),
    pytest.param(42, TypeError, id="int"),
    pytest.param(None, TypeError, id="none"),
    pytest.param(b"session", TypeError, id="bytes"),
    pytest.param(("a", "b"), TypeError, id="tuple"),
    pytest.param("x" * 257, ValueError, id="257-characters"),
    pytest.param("x" * 10_000, ValueError, id="10000-characters"),
    pytest.param("a\x00b", ValueError, id="contains-nul"),
    pytest.param("\x00", ValueError, id="only-nul"),
    pytest.param("\udc80", ValueError, id="lone-surrogate"),
]


@pytest.mark.parametrize(("session_id", "error"), BAD_SESSION_IDS)
async def test_bad_session_id(
    db_path: str, autojump_clock: object, session_id: object, error: type[Exception]
) -> None:
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("good", 1)
        with pytest.raises(error, match="session_id"):
            await system.send(session_id, "body")  # type: ignore[arg-type]
        with pytest.raises(error, match="item 1"):
            await system.send_many([("good", 2), (session_id, "body")])  # type: ignore[list-item]
        if session_id is not None:  # dead_letters(None) means every session
            with pytest.raises(error, match="session_id"):
                system.dead_letters(session_id)  # type: ignore[arg-type]
        await system.send("good", 3)
        await drain(system)
    assert handler.seen == [("good", 1, 1), ("good", 3, 1)]
    assert rows(db_path) == []


class Key(str):
    """A str subclass: accepted, stored as its plain value."""


ODD_SESSION_IDS = [
    pytest.param("x" * 256, id="256-characters"),
    pytest.param("é" * 256, id="256-two-byte-characters"),
    pytest.param(" ", id="a-space"),
    pytest.param("line\nbreak", id="newline"),
    pytest.param("🙂", id="emoji"),
    pytest.param("'; DROP TABLE messages; --", id="sql"),
    pytest.param(Key("subclass"), id="str-subclass"),
]


@pytest.mark.parametrize("session_id", ODD_SESSION_IDS)
async def test_odd_but_valid_session_id(
    db_path: str, autojump_clock: object, session_id: str
) -> None:
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send(session_id, "body")
        await drain(system)
    assert handler.seen == [(str(session_id), "body", 1)]
    assert type(handler.seen[0][0]) is str
    assert rows(db_path) == []


# -- delays -----------------------------------------------------------------------

BAD_DELAYS = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(-1e-9, ValueError, id="slightly-negative"),
    pytest.param(math.inf, ValueError, id="infinity"),
    pytest.param(-math.inf, ValueError, id="minus-infinity"),
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param("soon", TypeError, id="string"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(datetime.timedelta(seconds=1), TypeError, id="timedelta"),
]


@pytest.mark.parametrize(("delay", "error"), BAD_DELAYS)
async def test_bad_delay(
    db_path: str, autojump_clock: object, delay: object, error: type[Exception]
) -> None:
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(error, match="delay"):
            await system.send("s", "body", delay=delay)  # type: ignore[arg-type]
        await system.send("s", "zero", delay=0)
        await drain(system)
    assert handler.bodies == ["zero"]
    assert rows(db_path) == []


# -- handlers, options and paths run_system refuses -----------------------------------


def sync_handler(ctx: actors.Context, msg: actors.Message) -> None:
    pass  # pragma: no cover


class NotAnActor:
    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        pass  # pragma: no cover


class WithoutHandle(actors.Actor):
    pass


async def ok_handler(ctx: actors.Context, msg: actors.Message) -> None:
    pass  # pragma: no cover


# (path relative to tmp_path or a literal, handler, options, error, match)
BAD_SETUP = [
    pytest.param("a.db", sync_handler, {}, TypeError, "async function", id="sync-handler"),
    pytest.param("a.db", lambda ctx, msg: None, {}, TypeError, "async function", id="lambda"),
    pytest.param("a.db", None, {}, TypeError, "async function", id="handler-none"),
    pytest.param("a.db", NotAnActor, {}, TypeError, "subclass", id="class-not-an-actor"),
    pytest.param("a.db", WithoutHandle, {}, TypeError, "handle", id="actor-without-handle"),
    pytest.param("a.db", WithoutHandle(), {}, TypeError, "instance", id="actor-instance"),
    pytest.param("a.db", ok_handler, {"max_attempt": 3}, TypeError, "unknown", id="unknown-option"),
    pytest.param(
        "a.db", ok_handler, {"max_attempts": 0}, ValueError, "max_attempts", id="zero-attempts"
    ),
    pytest.param(
        "a.db", ok_handler, {"max_attempts": "3"}, TypeError, "max_attempts", id="attempts-str"
    ),
    pytest.param(
        "a.db",
        ok_handler,
        {"handler_timeout": -1},
        ValueError,
        "handler_timeout",
        id="negative-timeout",
    ),
    pytest.param(
        "a.db",
        ok_handler,
        {"idle_timeout": math.nan},
        ValueError,
        "idle_timeout",
        id="nan-idle-timeout",
    ),
    pytest.param(
        "a.db",
        ok_handler,
        {"durability": "fsync"},
        ValueError,
        "durability",
        id="unknown-durability",
    ),
    pytest.param(
        "a.db",
        ok_handler,
        {"max_message_bytes": 0},
        ValueError,
        "max_message_bytes",
        id="zero-message-bytes",
    ),
    pytest.param("", ok_handler, {}, ValueError, "path", id="empty-path"),
    pytest.param(":memory:", ok_handler, {}, ValueError, "path", id="memory-path"),
    pytest.param("file:a.db?mode=rwc", ok_handler, {}, ValueError, "path", id="uri-path"),
    pytest.param(b"a.db", ok_handler, {}, TypeError, "path", id="bytes-path"),
    pytest.param(42, ok_handler, {}, TypeError, "path", id="int-path"),
]


@pytest.mark.parametrize(("path", "handler", "options", "error", "match"), BAD_SETUP)
async def test_bad_setup_is_refused_before_touching_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: object,
    handler: object,
    options: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        async with actors.run_system(path, handler=handler, **options):  # type: ignore[arg-type]
            pytest.fail("the system started")
    assert os.listdir(tmp_path) == []  # no database, no lock file


# -- handlers that return a value ------------------------------------------------------

RETURNS = [
    pytest.param(42, id="int"),
    pytest.param("garbage", id="str"),
    pytest.param(False, id="false"),
    pytest.param({"status": "failed"}, id="dict"),
    pytest.param(ValueError("returned, not raised"), id="exception-instance"),
    pytest.param(object(), id="object"),
]


@pytest.mark.parametrize("style", ["function", "actor-class"])
@pytest.mark.parametrize("value", RETURNS)
async def test_handler_return_value_is_ignored(
    db_path: str, autojump_clock: object, value: object, style: str
) -> None:
    """What a handler returns means nothing: the message counts as processed."""
    calls: list[tuple[Any, int]] = []

    async def handle(ctx: actors.Context, msg: actors.Message) -> object:
        calls.append((msg.body, msg.attempt))
        return value

    class Returning(actors.Actor):
        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            return await handle(ctx, msg)  # type: ignore[func-returns-value]

    handler = handle if style == "function" else Returning
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", 1)
        await system.send("s", 2)
        await drain(system)
        stats = system.statistics()
        assert (stats.processed, stats.failed_attempts, stats.dead) == (2, 0, 0)
        assert system.dead_letters() == []
    assert calls == [(1, 1), (2, 1)]
    assert rows(db_path) == []


# -- handlers that raise a BaseException ------------------------------------------------


class Fatal(BaseException):
    """A custom BaseException subclass (not an Exception)."""


BASE_EXCEPTIONS = [
    pytest.param(KeyboardInterrupt, id="KeyboardInterrupt"),
    pytest.param(SystemExit, id="SystemExit"),
    pytest.param(GeneratorExit, id="GeneratorExit"),
    pytest.param(Fatal, id="custom-BaseException"),
]


@pytest.mark.parametrize("exc_type", BASE_EXCEPTIONS)
async def test_handler_raising_base_exception_stops_the_system_and_keeps_the_message(
    db_path: str, store_clock: object, exc_type: type[BaseException]
) -> None:
    """It surfaces from ``async with run_system`` (as itself, not in a group);
    the message stays in the database, pending, and runs at the next start."""
    seen: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "fatal" and msg.attempt == 1:
            raise exc_type("from the handler")
        seen.append((msg.body, msg.attempt))

    with pytest.raises(exc_type) as info:
        async with actors.run_system(db_path, handler=handler) as system:
            # One batch: no send is being delivered when the handler raises
            # (for that race see the test below).
            await system.send_many([("s", "first"), ("s", "fatal"), ("s", "next")])
            await drain(system)
    assert info.value.args == ("from the handler",)
    assert seen == [("first", 1)]
    # Pending (state 0), its attempt counted, marked as a crash; "next" untouched.
    assert rows(db_path, "SELECT body, state, attempts, crashed FROM messages ORDER BY id") == [
        ('"fatal"', 0, 1, 1),
        ('"next"', 0, 0, 0),
    ]
    async with actors.run_system(db_path, handler=handler) as system:
        await drain(system)
    assert seen == [("first", 1), ("fatal", 2), ("next", 1)]
    assert rows(db_path) == []


async def test_handler_raising_base_exception_while_sends_are_delivered(
    tmp_path: Path, autojump_clock: object
) -> None:
    """The same, with sends still arriving: the exception must surface alone.

    The router may be delivering "next" while the actor dies; trio runs
    ready tasks in a random order, so the round is repeated.
    """
    outcomes: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "fatal":
            raise KeyboardInterrupt("from the handler")

    for i in range(20):
        path = tmp_path / f"round-{i}.db"
        try:
            async with actors.run_system(path, handler=handler) as system:
                await system.send("s", "first")
                await system.send("s", "fatal")
                await system.send("s", "next")
                await drain(system)
        except KeyboardInterrupt:
            outcomes.append("KeyboardInterrupt")
        except BaseExceptionGroup as group:
            leaves = ", ".join(f"{type(e).__name__}: {e}" for e in _leaves(group))
            outcomes.append(f"group of {leaves}")
    assert set(outcomes) == {"KeyboardInterrupt"}, outcomes


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
async def test_handler_raising_base_exception_every_time_ends_in_dead_letters(
    db_path: str, autojump_clock: object, exc_type: type[BaseException]
) -> None:
    """No crash loop: each start runs it once more, until max_attempts."""
    seen: list[tuple[str, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "poison":
            raise exc_type("again")
        seen.append((msg.body, msg.attempt))

    starts = 0
    while True:
        starts += 1
        assert starts <= 5, "a crash loop"
        try:
            async with actors.run_system(db_path, handler=handler, max_attempts=2) as system:
                if starts == 1:  # one batch, clear of the race tested above
                    await system.send_many([("s", "poison"), ("s", "after")])
                await drain(system)
                letters = system.dead_letters()
            break
        except exc_type:
            continue
    assert starts == 3  # two attempts, each ending the process; the third start gives up
    [letter] = letters
    assert (letter.body, letter.attempts) == ("poison", 2)
    assert "kills the process" in letter.last_error
    assert seen == [("after", 1)]


# -- handlers that block the event loop -----------------------------------------------


@pytest.mark.parametrize("then_checkpoint", [False, True], ids=["no-checkpoint", "then-checkpoint"])
async def test_handler_blocking_the_event_loop(db_path: str, then_checkpoint: bool) -> None:
    """``time.sleep(0.2)`` in a handler with ``handler_timeout=0.05`` (real clock).

    Nothing is lost and everything is processed. The timeout cannot interrupt
    the blocking call. Without a checkpoint after it the handler finishes and
    its message counts as processed. With one, the watchdog's cancellation
    races the handler's return: the attempt either completes or times out and
    is retried, and both are honest.
    """
    seen: list[tuple[str, Any, int]] = []
    blocked_for: list[float] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "block" and msg.attempt == 1:
            start = time.monotonic()
            time.sleep(0.2)  # noqa: ASYNC251 - the point of the test
            blocked_for.append(time.monotonic() - start)
            if then_checkpoint:
                await trio.lowlevel.checkpoint()
        seen.append((ctx.session_id, msg.body, msg.attempt))

    fast = actors.Backoff(initial=0.001, jitter=0.0)
    async with actors.run_system(
        db_path,
        handler=handler,
        handler_timeout=0.05,
        retry_backoff=fast,
        restart_policy=actors.RestartPolicy(backoff=fast),
    ) as system:
        await system.send_many([("b", "block"), *((f"other-{i}", i) for i in range(5))])
        await system.send("b", "after")
        await drain(system)
        stats = system.statistics()
    assert blocked_for and blocked_for[0] >= 0.2
    assert sorted((s, b) for s, b, _ in seen) == sorted(
        [("b", "block"), ("b", "after"), *((f"other-{i}", i) for i in range(5))]
    )
    timed_out = stats.failed_attempts
    if then_checkpoint:
        assert timed_out in (0, 1)
    else:
        assert timed_out == 0
    assert [(b, a) for s, b, a in seen if s == "b"] == [("block", 1 + timed_out), ("after", 1)]
    assert stats.dead == 0
    assert rows(db_path) == []


# -- database files ----------------------------------------------------------------------


async def make_database(path: str, bodies: list[str]) -> None:
    """A database of ours with pending messages, written by a real system."""
    async with actors.run_system(path, handler=ok_handler) as system:
        for body in bodies:
            await system.send("s", body, delay=3600)  # pending, not processed


@contextmanager
def read_only_file(path: str) -> Iterator[None]:
    """Make ``path`` read-only for this process, even as root.

    chmod is enough for other users. root ignores permission bits, so then
    the file is made immutable (``chattr +i``, which root cannot write
    through either); if that is impossible here, the test is skipped.
    """
    if os.geteuid() != 0:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o644)
        return
    try:
        done = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("running as root without chattr: cannot make a file read-only for root")
    if done.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed ({done.stderr.strip()})")
    try:
        try:
            open(path, "r+b").close()  # a probe
        except PermissionError:
            pass
        else:
            pytest.skip("chattr +i does not stop root from writing on this file system")
        yield
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


# Each prepares a bad file in a directory and returns its path.


async def text_file(d: Path) -> str:
    (d / "app.db").write_bytes(b"this is not an SQLite database, just some text\n" * 100)
    return str(d / "app.db")


async def random_bytes(d: Path) -> str:
    (d / "app.db").write_bytes(random.Random(1).randbytes(8192))
    return str(d / "app.db")


async def corrupt_header(d: Path) -> str:
    path = d / "app.db"
    await make_database(str(path), ["lost-with-the-header"])
    data = bytearray(path.read_bytes())
    data[16:100] = random.Random(7).randbytes(84)  # page size, versions, counters...
    path.write_bytes(bytes(data))
    return str(path)


async def newer_schema(d: Path) -> str:
    path = str(d / "app.db")
    await make_database(path, ["kept-1", "kept-2"])
    conn = apsw.Connection(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    return path


async def another_applications_database(d: Path) -> str:
    path = str(d / "app.db")
    conn = apsw.Connection(path)
    conn.execute("CREATE TABLE messages (theirs TEXT); INSERT INTO messages VALUES ('their row')")
    conn.close()
    return path


async def another_applications_database_without_messages(d: Path) -> str:
    path = str(d / "app.db")
    conn = apsw.Connection(path)
    conn.execute("CREATE TABLE orders (id INTEGER); INSERT INTO orders VALUES (1)")
    conn.close()
    return path


async def a_directory(d: Path) -> str:
    (d / "app.db").mkdir()
    return str(d / "app.db")


async def inside_a_missing_directory(d: Path) -> str:
    return str(d / "missing" / "app.db")


# (prepare(directory) -> path, error, match, what must stay unchanged: "bytes" or a query)
BAD_FILES = [
    pytest.param(text_file, actors.StoreError, "not an SQLite database", "bytes", id="text"),
    pytest.param(random_bytes, actors.StoreError, "not an SQLite database", "bytes", id="random"),
    pytest.param(
        corrupt_header, actors.StoreError, "not an SQLite database", "bytes", id="corrupt-header"
    ),
    pytest.param(
        newer_schema,
        actors.SchemaVersionError,
        "schema version 99, newer",
        "SELECT body, state FROM messages ORDER BY id",
        id="newer-schema-version",
    ),
    pytest.param(
        another_applications_database,
        actors.StoreError,
        "database of another application",
        "SELECT * FROM messages",
        id="another-applications-database",
    ),
    pytest.param(
        another_applications_database_without_messages,
        actors.StoreError,
        "database of another application",
        "SELECT * FROM orders",
        id="another-applications-database-without-messages",
    ),
    pytest.param(a_directory, ValueError, "is a directory", None, id="a-directory"),
    pytest.param(
        inside_a_missing_directory,
        actors.StoreError,
        "missing",
        None,
        id="inside-a-missing-directory",
    ),
]


@pytest.mark.parametrize(("prepare", "error", "match", "unchanged"), BAD_FILES)
async def test_bad_database_file(
    tmp_path: Path,
    store_clock: object,
    prepare: Callable[[Path], Awaitable[str]],
    error: type[Exception],
    match: str,
    unchanged: str | None,
) -> None:
    """A clear error, the file untouched, and the lock released for the next try."""
    path = await prepare(tmp_path)
    before = snapshot(path, unchanged)
    for _ in range(2):  # the second try fails the same way, not with DatabaseInUseError
        with pytest.raises(error, match=match):
            async with actors.run_system(path, handler=ok_handler):
                pytest.fail("the system started on an unusable file")
        assert snapshot(path, unchanged) == before


def open_files(prefix: str) -> list[str]:
    """Files under ``prefix`` this process has open (Linux)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(prefix):
            found.append(target)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("prepare", [text_file, another_applications_database])
async def test_a_refused_file_is_closed(
    tmp_path: Path, store_clock: object, prepare: Callable[[Path], Awaitable[str]]
) -> None:
    """When run_system raises, nothing holds the file open any more, not even a
    connection kept alive by the error's traceback while the caller holds it."""
    path = await prepare(tmp_path)
    with pytest.raises(actors.StoreError) as error:
        async with actors.run_system(path, handler=ok_handler):
            pytest.fail("the system started on an unusable file")
    assert open_files(str(tmp_path)) == [], f"still open after {error.value!r}"


def snapshot(path: str, unchanged: str | None) -> object:
    if unchanged is None:
        return None
    if unchanged == "bytes":
        return Path(path).read_bytes()
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return (conn.execute(unchanged).fetchall(), conn.execute("PRAGMA user_version").fetchall())
    finally:
        conn.close()


READ_ONLY = r"attempt to write a readonly database"


@pytest.mark.parametrize("how", ["file-flag", "vfs"])
async def test_read_only_database(tmp_path: Path, store_clock: object, how: str) -> None:
    """A database that may not be written: StoreError; the messages wait in it.

    ``file-flag``: the file itself is read-only (chmod, or as root chattr +i).
    ``vfs``: SQLite opens it read-only, as its unix VFS does when it may not
    open a file for writing; this runs everywhere.
    """
    path = str(tmp_path / "app.db")
    await make_database(path, ["kept-1", "kept-2"])
    before = rows(path)
    if how == "file-flag":
        with read_only_file(path), pytest.raises(actors.StoreError, match=READ_ONLY):
            async with actors.run_system(path, handler=ok_handler):
                pytest.fail("the system started on a read-only database")
    else:
        with FaultVFS(under=str(tmp_path)) as vfs:
            vfs.read_only()
            with pytest.raises(actors.StoreError, match=READ_ONLY):
                async with actors.run_system(path, handler=ok_handler):
                    pytest.fail("the system started on a read-only database")
    assert rows(path) == before
    handler = Recorder()
    async with actors.run_system(path, handler=handler) as system:
        assert system.statistics().pending == 2
    assert rows(path) == before  # still there, still delayed


async def test_empty_file_is_a_new_database(tmp_path: Path, store_clock: object) -> None:
    """Not bad after all: SQLite treats an empty file as an empty database."""
    path = tmp_path / "app.db"
    path.write_bytes(b"")
    handler = Recorder()
    async with actors.run_system(path, handler=handler) as system:
        await system.send("s", "works")
        await drain(system)
    assert handler.bodies == ["works"]


async def test_same_file_twice(db_path: str, store_clock: object) -> None:
    """A second system on a file in use: DatabaseInUseError; the first goes on."""
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", 1)
        with pytest.raises(actors.DatabaseInUseError, match="already in use"):
            async with actors.run_system(db_path, handler=handler):
                pytest.fail("two systems on one file")
        await system.send("s", 2)
        await drain(system)
    assert handler.bodies == [1, 2]


ROWS = (
    len(BAD_BODIES)
    + len(BODY_SIZES)
    + len(BAD_SESSION_IDS)
    + len(ODD_SESSION_IDS)
    + len(BAD_DELAYS)
    + len(BAD_SETUP)
    + len(RETURNS) * 2
    + len(BASE_EXCEPTIONS)
    + 1  # a base exception while sends are delivered
    + 2  # base exceptions every time
    + 2  # blocking handlers
    + len(BAD_FILES)
    + 2  # refused files are closed
    + 2  # read-only
    + 1  # empty file
    + 1  # same file twice
)
