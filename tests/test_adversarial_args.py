"""Arguments out of range or of the wrong type, at every public entry point.

Each public method checks its arguments before anything reaches the store
(actors/_validate.py): ``TypeError`` for a wrong type (a bool is not an
int), ``ValueError`` for a value out of range, never ``OverflowError``, and
never a quiet ``False`` / ``0`` / ``[]`` for a call that cannot mean
anything. A running system is never affected: after each bad call it still
processes a message and ``drain()`` returns.

The tables, by entry point:

- BAD_CALLS: the System's methods (ids, limits, durations, buffers,
  session filters, send_many items), one row per bad value.
- EDGE_CALLS: the largest and smallest values that are in range, accepted.
- BAD_REQUESTS: the same ids and numbers arriving through the control table
  (``actors abort/retry/purge`` against a running system), and through
  ``DirectTarget`` (no system running); and the command itself, ``actors
  abort/retry --id 2**63`` against a running system on the real clock.
- BAD_OPTIONS: ``run_system`` options, ``Backoff`` and ``RestartPolicy``
  values refused before the file is touched.
- Backoff: total for any n (a multiplier of 1e5 overflowed a float after
  63 failures and stopped every session).
"""

from __future__ import annotations

import datetime
import decimal
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from click.testing import CliRunner
from hypothesis import given

import actors
from actors._cli import cli
from actors._control import DirectTarget, apply
from actors._validate import MAX_BUSY_TIMEOUT, MAX_INT, MAX_SECONDS
from actors.store.sqlite import SqliteStore

HANG = 10.0  # seconds (virtual under MockClock) after which a wait is a hang
HUGE = 10**400  # an int no float holds: float(HUGE) raises OverflowError


class Recorder:
    """A handler that records the bodies it processed."""

    def __init__(self) -> None:
        self.bodies: list[Any] = []

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.bodies.append(msg.body)


async def still_works(system: actors.System, handler: Recorder) -> None:
    """The system processes a new message and drain() returns."""
    before = len(handler.bodies)
    await system.send("check", "still working")
    with trio.fail_after(HANG):
        await system.drain()
    assert handler.bodies[before:] == ["still working"]


async def call(system: actors.System, method: Callable[[actors.System], Any]) -> Any:
    result = method(system)
    if inspect.isawaitable(result):
        result = await result
    return result


Method = Callable[[actors.System], Any]


def bad(name: str, method: Method, error: type[Exception], match: str) -> Any:
    return pytest.param(method, error, match, id=name)


# (method, error, match): every row raises ``error`` with ``match`` in its message.
BAD_CALLS = [
    # -- message ids: abort and retry_dead ----------------------------------------
    bad("abort-2**63", lambda s: s.abort(2**63), ValueError, "message_id"),
    bad("abort-huge", lambda s: s.abort(HUGE), ValueError, "message_id"),
    bad("abort-0", lambda s: s.abort(0), ValueError, "message_id"),
    bad("abort-negative", lambda s: s.abort(-1), ValueError, "message_id"),
    bad("abort-min-int64", lambda s: s.abort(-(2**63)), ValueError, "message_id"),
    bad("abort-str", lambda s: s.abort("5"), TypeError, "message_id"),
    bad("abort-none", lambda s: s.abort(None), TypeError, "message_id"),
    bad("abort-true", lambda s: s.abort(True), TypeError, "message_id"),
    bad("abort-float", lambda s: s.abort(1.0), TypeError, "message_id"),
    bad("abort-list", lambda s: s.abort([1]), TypeError, "message_id"),
    bad("retry-2**63", lambda s: s.retry_dead(2**63), ValueError, "message_id"),
    bad("retry-huge", lambda s: s.retry_dead(-HUGE), ValueError, "message_id"),
    bad("retry-0", lambda s: s.retry_dead(0), ValueError, "message_id"),
    bad("retry-negative", lambda s: s.retry_dead(-5), ValueError, "message_id"),
    bad("retry-true", lambda s: s.retry_dead(True), TypeError, "message_id"),
    bad("retry-false", lambda s: s.retry_dead(False), TypeError, "message_id"),
    bad("retry-str", lambda s: s.retry_dead("5"), TypeError, "message_id"),
    bad("retry-float", lambda s: s.retry_dead(2.0), TypeError, "message_id"),
    # -- send(delay=) ----------------------------------------------------------------
    bad("delay-1e300", lambda s: s.send("s", 1, delay=1e300), ValueError, "delay"),
    bad("delay-huge-int", lambda s: s.send("s", 1, delay=HUGE), ValueError, "delay"),
    bad("delay-over-max", lambda s: s.send("s", 1, delay=MAX_SECONDS * 2), ValueError, "delay"),
    bad("delay-negative", lambda s: s.send("s", 1, delay=-1), ValueError, "delay"),
    bad("delay-inf", lambda s: s.send("s", 1, delay=math.inf), ValueError, "delay"),
    bad("delay-nan", lambda s: s.send("s", 1, delay=math.nan), ValueError, "delay"),
    bad("delay-str", lambda s: s.send("s", 1, delay="1"), TypeError, "delay"),
    bad("delay-true", lambda s: s.send("s", 1, delay=True), TypeError, "delay"),
    bad("delay-decimal", lambda s: s.send("s", 1, delay=decimal.Decimal(1)), TypeError, "delay"),
    bad(
        "delay-timedelta",
        lambda s: s.send("s", 1, delay=datetime.timedelta(seconds=1)),
        TypeError,
        "delay",
    ),
    # -- ask(timeout=) -----------------------------------------------------------------
    bad("timeout-1e300", lambda s: s.ask("s", 1, timeout=1e300), ValueError, "timeout"),
    bad("timeout-huge-int", lambda s: s.ask("s", 1, timeout=HUGE), ValueError, "timeout"),
    bad("timeout-negative", lambda s: s.ask("s", 1, timeout=-0.5), ValueError, "timeout"),
    bad("timeout-inf", lambda s: s.ask("s", 1, timeout=math.inf), ValueError, "timeout"),
    bad("timeout-nan", lambda s: s.ask("s", 1, timeout=math.nan), ValueError, "timeout"),
    bad("timeout-str", lambda s: s.ask("s", 1, timeout="5"), TypeError, "timeout"),
    bad("timeout-true", lambda s: s.ask("s", 1, timeout=True), TypeError, "timeout"),
    # -- purge ---------------------------------------------------------------------------
    bad(
        "older-than-1e300",
        lambda s: s.purge(dead=True, older_than=1e300),
        ValueError,
        "older_than",
    ),
    bad(
        "older-than-huge-int",
        lambda s: s.purge(dead=True, older_than=HUGE),
        ValueError,
        "older_than",
    ),
    bad("older-than-nan", lambda s: s.purge(dead=True, older_than=math.nan), ValueError, "older"),
    bad("older-than-negative", lambda s: s.purge(dead=True, older_than=-1), ValueError, "older"),
    bad("older-than-str", lambda s: s.purge(dead=True, older_than="7d"), TypeError, "older"),
    bad("older-than-true", lambda s: s.purge(dead=True, older_than=True), TypeError, "older"),
    bad("purge-dead-str", lambda s: s.purge(dead="yes"), TypeError, "dead"),
    bad("purge-dead-int", lambda s: s.purge(dead=1), TypeError, "dead"),
    bad("purge-dead-none", lambda s: s.purge(session_id="s", dead=None), TypeError, "dead"),
    bad("purge-session-int", lambda s: s.purge(session_id=5), TypeError, "session_id"),
    bad("purge-session-empty", lambda s: s.purge(session_id=""), ValueError, "session_id"),
    bad("purge-nothing", lambda s: s.purge(), ValueError, "session_id"),
    # -- health(stall_after=) ----------------------------------------------------------
    bad("stall-after-0", lambda s: s.health(stall_after=0), ValueError, "stall_after"),
    bad("stall-after-1e300", lambda s: s.health(stall_after=1e300), ValueError, "stall_after"),
    bad("stall-after-huge", lambda s: s.health(stall_after=HUGE), ValueError, "stall_after"),
    bad("stall-after-inf", lambda s: s.health(stall_after=math.inf), ValueError, "stall_after"),
    bad("stall-after-none", lambda s: s.health(stall_after=None), TypeError, "stall_after"),
    bad("stall-after-true", lambda s: s.health(stall_after=True), TypeError, "stall_after"),
    # -- dead_letters --------------------------------------------------------------------
    bad("limit-negative", lambda s: s.dead_letters(limit=-1), ValueError, "limit"),
    bad("limit-2**63", lambda s: s.dead_letters(limit=2**63), ValueError, "limit"),
    bad("limit-huge", lambda s: s.dead_letters(limit=HUGE), ValueError, "limit"),
    bad("limit-str", lambda s: s.dead_letters(limit="3"), TypeError, "limit"),
    bad("limit-true", lambda s: s.dead_letters(limit=True), TypeError, "limit"),
    bad("limit-float", lambda s: s.dead_letters(limit=3.0), TypeError, "limit"),
    bad("dead-letters-session-int", lambda s: s.dead_letters(5), TypeError, "session_id"),
    bad("dead-letters-session-bytes", lambda s: s.dead_letters(b"s"), TypeError, "session_id"),
    bad("dead-letters-session-empty", lambda s: s.dead_letters(""), ValueError, "session_id"),
    # -- subscribe / events (buffer=) ----------------------------------------------------
    bad("subscribe-buffer-0", lambda s: s.subscribe("s", buffer=0), ValueError, "buffer"),
    bad("subscribe-buffer-2**63", lambda s: s.subscribe("s", buffer=2**63), ValueError, "buffer"),
    bad("subscribe-buffer-true", lambda s: s.subscribe("s", buffer=True), TypeError, "buffer"),
    bad("subscribe-buffer-float", lambda s: s.subscribe("s", buffer=1.5), TypeError, "buffer"),
    bad("subscribe-buffer-inf", lambda s: s.subscribe("s", buffer=math.inf), TypeError, "buffer"),
    bad("subscribe-session-int", lambda s: s.subscribe(5), TypeError, "session_id"),
    bad("events-buffer-negative", lambda s: s.events(buffer=-1), ValueError, "buffer"),
    bad("events-buffer-huge", lambda s: s.events(buffer=HUGE), ValueError, "buffer"),
    bad("events-buffer-str", lambda s: s.events(buffer="2"), TypeError, "buffer"),
    # -- kill / is_active ---------------------------------------------------------------
    bad("kill-int", lambda s: s.kill(5), TypeError, "session_id"),
    bad("kill-none", lambda s: s.kill(None), TypeError, "session_id"),
    bad("kill-list", lambda s: s.kill([]), TypeError, "session_id"),
    bad("kill-empty", lambda s: s.kill(""), ValueError, "session_id"),
    bad("is-active-int", lambda s: s.is_active(5), TypeError, "session_id"),
    bad("is-active-none", lambda s: s.is_active(None), TypeError, "session_id"),
    bad("is-active-nul", lambda s: s.is_active("a\x00b"), ValueError, "session_id"),
    # -- send_many items -----------------------------------------------------------------
    bad("send-many-str-item", lambda s: s.send_many(["ab"]), TypeError, "item 0"),
    bad("send-many-dict-item", lambda s: s.send_many([{"s": 1, "t": 2}]), TypeError, "item 0"),
    bad("send-many-int-item", lambda s: s.send_many([("s", 1), 5]), TypeError, "item 1"),
    bad("send-many-one-value", lambda s: s.send_many([("s",)]), ValueError, "item 0"),
    bad("send-many-four-values", lambda s: s.send_many([("s", 1, "k", 2)]), ValueError, "item 0"),
    bad("send-many-key-int", lambda s: s.send_many([("s", 1, 7)]), TypeError, "item 0"),
]


@pytest.mark.parametrize(("method", "error", "match"), BAD_CALLS)
async def test_a_bad_argument_is_refused_and_the_system_keeps_working(
    db_path: str,
    autojump_clock: object,
    method: Method,
    error: type[Exception],
    match: str,
) -> None:
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler, max_attempts=1) as system:
        await system.send("s", "before")
        with trio.fail_after(HANG):
            await system.drain()
        with pytest.raises(error, match=match) as info:
            await call(system, method)
        assert type(info.value) is error  # not a subclass such as OverflowError's kin
        assert len(str(info.value)) < 200  # a huge value is described, not printed
        await still_works(system, handler)
        assert system.statistics().processed == 2
    assert handler.bodies == ["before", "still working"]


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(lambda s: s.abort(2**63), id="abort-2**63"),
        pytest.param(lambda s: s.retry_dead(2**63), id="retry-2**63"),
        pytest.param(lambda s: s.abort(-(2**63) - 1), id="abort-below-int64"),
    ],
)
async def test_an_id_sqlite_cannot_hold_never_reaches_the_store(
    db_path: str, clock: object, method: Method
) -> None:
    # Both store modes (inline on the MockClock, the committer on the real
    # clock): the store used to fail on the id, and with it the system.
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        commits = system.statistics().commits
        with pytest.raises(ValueError, match="message_id"):
            await call(system, method)
        assert system.statistics().commits == commits
        await still_works(system, handler)


# (method, check of the result): in range at the edges, accepted.
EDGE_CALLS = [
    pytest.param(lambda s: s.abort(MAX_INT), lambda r: r is False, id="abort-max-id"),
    pytest.param(lambda s: s.abort(1), lambda r: r is True, id="abort-id-1"),  # the dead letter
    pytest.param(lambda s: s.retry_dead(MAX_INT), lambda r: r == 0, id="retry-max-id"),
    pytest.param(lambda s: s.dead_letters(limit=0), lambda r: r == [], id="limit-0"),
    pytest.param(lambda s: s.dead_letters(limit=MAX_INT), lambda r: len(r) == 1, id="limit-max"),
    pytest.param(
        lambda s: s.ask("s", "ask", timeout=MAX_SECONDS), lambda r: r is None, id="timeout-max"
    ),
    pytest.param(
        lambda s: s.purge(dead=True, older_than=MAX_SECONDS), lambda r: r == 0, id="older-than-max"
    ),
    pytest.param(
        lambda s: s.health(stall_after=MAX_SECONDS), lambda r: r.healthy, id="stall-after-max"
    ),
    pytest.param(
        lambda s: s.subscribe("s", buffer=MAX_INT).statistics().buffer_size == MAX_INT,
        lambda r: r is True,
        id="buffer-max",
    ),
    pytest.param(lambda s: s.kill("nobody"), lambda r: r is False, id="kill-no-actor"),
    pytest.param(
        lambda s: s.send_many([["s", "list item"]]), lambda r: len(r) == 1, id="list-item"
    ),
]


@pytest.mark.parametrize(("method", "check"), EDGE_CALLS)
async def test_values_at_the_edge_of_the_range_are_accepted(
    db_path: str, autojump_clock: object, method: Method, check: Callable[[Any], bool]
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "fail":
            raise ValueError("dead on purpose")

    async with actors.run_system(db_path, handler=handler, max_attempts=1) as system:
        await system.send("s", "fail")
        await system.drain()  # one dead letter
        assert check(await call(system, method))
        await system.send("check", "still working")
        with trio.fail_after(HANG):
            await system.drain()


async def test_the_longest_delay_is_accepted_and_stored(
    db_path: str, autojump_clock: object
) -> None:
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        later = await system.send("s", "in 31 years", delay=MAX_SECONDS)
        await system.send("other", "now")
        assert await system.abort(later)  # else drain() would wait 31 virtual years
        with trio.fail_after(HANG):
            await system.drain()
    assert handler.bodies == ["now"]


# -- the control channel: actors abort / retry / purge against a running system ---------


def put_request(path: str, command: str, args_json: str) -> int:
    conn = apsw.Connection(path)
    try:
        conn.execute(
            "INSERT INTO control (command, args, requested_at) VALUES (?, ?, ?)",
            (command, args_json, time.time()),
        )
        return conn.last_insert_rowid()
    finally:
        conn.close()


def outcome_of(path: str, request_id: int) -> dict[str, Any] | None:
    conn = apsw.Connection(path)
    try:
        rows = conn.execute(
            "SELECT done_at, result FROM control WHERE id = ?", (request_id,)
        ).fetchall()
    finally:
        conn.close()
    if not rows or rows[0][0] is None:
        return None
    result: dict[str, Any] = json.loads(rows[0][1])
    return result


# (command, arguments as JSON, what the error names)
BAD_REQUESTS = [
    pytest.param("abort", json.dumps({"id": 2**63}), "'id'", id="abort-2**63"),
    pytest.param("abort", json.dumps({"id": 2**64 + 1}), "'id'", id="abort-2**64"),
    pytest.param("abort", '{"id": 1' + "0" * 5000 + "}", "", id="abort-5000-digits"),
    pytest.param("abort", json.dumps({"id": -1}), "'id'", id="abort-negative"),
    pytest.param("abort", json.dumps({"id": 0}), "'id'", id="abort-0"),
    pytest.param("abort", json.dumps({"id": 1.5}), "'id'", id="abort-float"),
    pytest.param("abort", json.dumps({"id": None}), "'id'", id="abort-null"),
    pytest.param("retry", json.dumps({"id": 2**63}), "'id'", id="retry-2**63"),
    pytest.param("retry", json.dumps({"id": True}), "'id'", id="retry-true"),
    pytest.param("retry", json.dumps({"id": "7"}), "'id'", id="retry-str"),
    pytest.param("retry", json.dumps({"all": "yes"}), "'id'", id="retry-all-str"),
    pytest.param(
        "purge", json.dumps({"dead": True, "older_than": 1e300}), "older_than", id="purge-1e300"
    ),
    pytest.param(
        "purge", '{"dead": true, "older_than": 1' + "0" * 400 + "}", "older_than", id="purge-huge"
    ),
    pytest.param("purge", '{"dead": true, "older_than": NaN}', "older_than", id="purge-nan"),
    pytest.param(
        "purge", '{"dead": true, "older_than": Infinity}', "older_than", id="purge-infinity"
    ),
    pytest.param("purge", json.dumps({"dead": 1}), "dead", id="purge-dead-int"),
    pytest.param("purge", json.dumps({"session": 5}), "session_id", id="purge-session-int"),
    pytest.param("purge", json.dumps({"session": "\ud800"}), "session_id", id="purge-surrogate"),
    pytest.param("purge", json.dumps({"session": ["s"]}), "session_id", id="purge-session-list"),
]


@pytest.mark.parametrize(("command", "args_json", "names"), BAD_REQUESTS)
async def test_a_bad_request_through_the_control_table_gets_an_error_reply(
    db_path: str, autojump_clock: object, command: str, args_json: str, names: str
) -> None:
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        request_id = put_request(db_path, command, args_json)
        await trio.sleep(2 * system.config.control_interval)
        outcome = outcome_of(db_path, request_id)
        assert outcome is not None and outcome["ok"] is False
        assert names in outcome["error"]
        assert len(outcome["error"]) < 300
        await still_works(system, handler)
        # A good request after it is still served.
        good = put_request(db_path, "purge", json.dumps({"dead": True}))
        await trio.sleep(2 * system.config.control_interval)
        assert outcome_of(db_path, good) == {
            "ok": True,
            "count": 0,
            "detail": "purged 0 message(s)",
        }


@pytest.mark.parametrize(("command", "args_json", "names"), BAD_REQUESTS)
async def test_a_bad_request_with_no_system_running_gets_an_error_reply(
    db_path: str, autojump_clock: object, command: str, args_json: str, names: str
) -> None:
    # The command line's direct path (DirectTarget): the same checks, so
    # nothing out of range reaches the store there either.
    async def fail(ctx: actors.Context, msg: actors.Message) -> None:
        raise ValueError("dead on purpose")

    async with actors.run_system(db_path, handler=fail, max_attempts=1) as system:
        dead_id = await system.send("s", 1)
        await system.drain()
    store, _opened = await SqliteStore.open(db_path, durability="normal", busy_timeout=5.0)
    try:
        target = DirectTarget(store)
        outcome = await apply(target, command, args_json)
        assert outcome["ok"] is False
        assert names in outcome["error"]
        assert not store.failed.is_set()
        assert await apply(target, "retry", json.dumps({"id": dead_id})) == {
            "ok": True,
            "count": 1,
            "detail": f"requeued dead letter {dead_id}",
        }
    finally:
        await store.aclose()


# -- run_system options, Backoff and RestartPolicy ---------------------------------------


async def ok_handler(ctx: actors.Context, msg: actors.Message) -> None:
    pass  # pragma: no cover


def option(name: str, value: object, error: type[Exception], field: str | None = None) -> Any:
    return pytest.param({name: value}, error, field or name, id=f"{name}-{value!r}"[:40])


BAD_OPTIONS = [
    # counts
    option("max_attempts", "3", TypeError),
    option("max_attempts", True, TypeError),
    option("max_attempts", 2.0, TypeError),
    option("max_attempts", 0, ValueError),
    option("max_attempts", 2**31, ValueError),
    option("max_active", None, TypeError),
    option("max_active", -1, ValueError),
    option("fair_share", 2**63, ValueError),
    option("mailbox_size", 2**63, ValueError),
    option("mailbox_size", False, TypeError),
    option("max_message_bytes", 2**40, ValueError),
    option("max_message_bytes", 1.5, TypeError),
    # durations
    option("busy_timeout", 1e300, ValueError),
    option("busy_timeout", MAX_BUSY_TIMEOUT + 1, ValueError),
    option("busy_timeout", 0, ValueError),
    option("busy_timeout", "5", TypeError),
    option("idle_timeout", math.inf, ValueError),
    option("idle_timeout", HUGE, ValueError),
    option("idle_timeout", True, TypeError),
    option("handler_timeout", math.inf, ValueError),
    option("handler_timeout", 0, ValueError),
    option("handler_timeout", "300", TypeError),
    option("shutdown_timeout", 1e300, ValueError),
    option("status_interval", MAX_SECONDS * 10, ValueError),
    option("control_interval", math.nan, ValueError),
    option("key_retention", -1, ValueError),
    option("key_retention", math.inf, ValueError),
    option("key_retention", datetime.timedelta(days=1), TypeError),
    # the others
    option("durability", 1, TypeError),
    option("durability", "fsync", ValueError),
    option("retry_backoff", 2.0, TypeError),
    option("retry_backoff", {"initial": 1}, TypeError),
    option("restart_policy", None, TypeError),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS)
async def test_a_bad_option_is_refused_before_touching_the_file(
    tmp_path: Path, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    path = tmp_path / "a.db"
    with pytest.raises(error, match=match) as info:
        async with actors.run_system(path, handler=ok_handler, **options):
            pytest.fail("the system started")
    assert type(info.value) is error
    assert os.listdir(tmp_path) == []  # no database, no lock file
    with pytest.raises(error, match=match):
        actors.Config(**options)


async def test_rng_must_be_a_random(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="rng"):
        async with actors.run_system(tmp_path / "a.db", handler=ok_handler, rng=42):  # type: ignore[arg-type]
            pytest.fail("the system started")
    assert os.listdir(tmp_path) == []


# (keyword arguments, error, the field named)
BAD_BACKOFFS = [
    pytest.param({"initial": -1}, ValueError, "initial", id="initial-negative"),
    pytest.param({"initial": 1e300}, ValueError, "initial", id="initial-1e300"),
    pytest.param({"initial": "1"}, TypeError, "initial", id="initial-str"),
    pytest.param({"maximum": math.inf}, ValueError, "maximum", id="maximum-inf"),
    pytest.param({"maximum": HUGE}, ValueError, "maximum", id="maximum-huge"),
    pytest.param({"maximum": True}, TypeError, "maximum", id="maximum-true"),
    pytest.param({"multiplier": 0.5}, ValueError, "multiplier", id="multiplier-below-1"),
    pytest.param({"multiplier": math.inf}, ValueError, "multiplier", id="multiplier-inf"),
    pytest.param({"multiplier": math.nan}, ValueError, "multiplier", id="multiplier-nan"),
    pytest.param({"multiplier": HUGE}, ValueError, "multiplier", id="multiplier-huge-int"),
    pytest.param({"multiplier": None}, TypeError, "multiplier", id="multiplier-none"),
    pytest.param({"jitter": 1.5}, ValueError, "jitter", id="jitter-over-1"),
    pytest.param({"jitter": -0.1}, ValueError, "jitter", id="jitter-negative"),
    pytest.param({"jitter": True}, TypeError, "jitter", id="jitter-true"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_BACKOFFS)
def test_a_bad_backoff_is_refused(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        actors.Backoff(**kwargs)
    assert type(info.value) is error


BAD_POLICIES = [
    pytest.param({"max_restarts": True}, TypeError, "max_restarts", id="max-restarts-true"),
    pytest.param({"max_restarts": 2.0}, TypeError, "max_restarts", id="max-restarts-float"),
    pytest.param({"max_restarts": 0}, ValueError, "max_restarts", id="max-restarts-0"),
    pytest.param({"max_restarts": 2**63}, ValueError, "max_restarts", id="max-restarts-2**63"),
    pytest.param({"window": 1e300}, ValueError, "window", id="window-1e300"),
    pytest.param({"window": math.nan}, ValueError, "window", id="window-nan"),
    pytest.param({"window": "60"}, TypeError, "window", id="window-str"),
    pytest.param({"backoff": 2.0}, TypeError, "backoff", id="backoff-float"),
    pytest.param({"backoff": None}, TypeError, "backoff", id="backoff-none"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_POLICIES)
def test_a_bad_restart_policy_is_refused(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as info:
        actors.RestartPolicy(**kwargs)
    assert type(info.value) is error


def test_backoff_with_a_huge_multiplier_stays_finite_and_capped() -> None:
    backoff = actors.Backoff(initial=1e-6, multiplier=1e5, maximum=30.0, jitter=0)
    delays = [backoff.delay(n) for n in range(1, 10_001)]
    assert delays[:3] == [1e-6, pytest.approx(0.1), 30.0]
    assert all(math.isfinite(d) and 0 <= d <= 30.0 for d in delays)
    assert delays[-1] == 30.0
    assert backoff.delay(HUGE) == 30.0  # an exponent past any float
    jittered = actors.Backoff(initial=1, multiplier=1e5, maximum=30.0, jitter=0.5)
    assert all(15.0 <= jittered.delay(n) <= 30.0 for n in (64, 65, 1000, 10_000))


def test_a_slow_multiplier_reaches_the_maximum() -> None:
    # The exponent was capped at 64: 1.05 ** 64 is about 22.7, so the delay
    # stopped growing at 22.7 s although the maximum was 100 s.
    backoff = actors.Backoff(initial=1.0, multiplier=1.05, maximum=100.0, jitter=0)
    assert backoff.delay(81) == pytest.approx(1.05**80)  # about 49.6
    assert backoff.delay(1000) == 100.0


def test_backoff_delay_checks_n() -> None:
    backoff = actors.Backoff()
    assert backoff.delay(0) == backoff.delay(-(2**70)) == 0.0
    with pytest.raises(TypeError, match="n"):
        backoff.delay(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n"):
        backoff.delay(True)


@given(
    initial=st.floats(min_value=0, max_value=MAX_SECONDS),
    multiplier=st.floats(min_value=1, allow_infinity=False, allow_nan=False),
    maximum=st.floats(min_value=0, max_value=MAX_SECONDS),
    jitter=st.floats(min_value=0, max_value=1),
    n=st.integers(min_value=1, max_value=2**80),
)
def test_backoff_delay_is_total(
    initial: float, multiplier: float, maximum: float, jitter: float, n: int
) -> None:
    backoff = actors.Backoff(initial=initial, multiplier=multiplier, maximum=maximum, jitter=jitter)
    delay = backoff.delay(n)
    assert math.isfinite(delay)
    assert 0 <= delay <= maximum


async def test_a_huge_backoff_multiplier_does_not_stop_the_system(
    db_path: str, autojump_clock: object
) -> None:
    # 100 failed attempts of one message: retries and restarts both go past
    # the 63rd delay, where 1e5 ** 63 left the range of a float.
    steep = actors.Backoff(initial=0.001, multiplier=1e5, maximum=1.0)
    failures: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "fail":
            failures.append(msg.attempt)
            raise ValueError("fails every time")

    async with actors.run_system(
        db_path,
        handler=handler,
        max_attempts=100,
        retry_backoff=steep,
        restart_policy=actors.RestartPolicy(max_restarts=1000, window=3600.0, backoff=steep),
    ) as system:
        doomed = await system.send("s", "fail")
        await system.send("other", "fine")
        with trio.fail_after(3600):
            await system.drain()
        assert failures == list(range(1, 101))
        assert [d.id for d in system.dead_letters()] == [doomed]
        await system.send("s", "after")
        with trio.fail_after(HANG):
            await system.drain()
        assert system.statistics().processed == 2


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["abort", "--id", str(2**63)], id="abort-2**63"),
        pytest.param(["retry", "--id", str(2**63)], id="retry-2**63"),
        pytest.param(["abort", "--id", "-1"], id="abort-negative"),
        pytest.param(["retry", "--id", "0"], id="retry-0"),
    ],
)
async def test_the_command_line_cannot_stop_a_running_system_with_an_id(
    db_path: str, args: list[str]
) -> None:
    # The real clock: the command polls the control table in real time.
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler, control_interval=0.02) as system:
        result = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(cli, [args[0], db_path, *args[1:], "--wait", "10"])
        )
        # Refused (1), or a usage error (2) if the command line checks first.
        assert result.exit_code in (1, 2), result.output
        await still_works(system, handler)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        pytest.param(1e300, ValueError, id="1e300"),
        pytest.param(HUGE, ValueError, id="huge-int"),
        pytest.param(-1, ValueError, id="negative"),
        pytest.param(math.nan, ValueError, id="nan"),
        pytest.param("5", TypeError, id="str"),
        pytest.param(True, TypeError, id="true"),
    ],
)
async def test_a_bridge_timeout_is_checked_before_anything_is_sent(
    db_path: str, bad: object, error: type[Exception]
) -> None:
    # It bounded only the caller's wait, so a bad one failed (OverflowError
    # from the threading module for 1e300) after the send was submitted.
    handler = Recorder()
    async with actors.run_system(db_path, handler=handler) as system:
        bridge = system.bridge()
        for send in (
            lambda: bridge.send("s", "lost", timeout=bad),  # type: ignore[arg-type]
            lambda: bridge.send_many([("s", "lost")], timeout=bad),  # type: ignore[arg-type]
        ):
            with pytest.raises(error, match="timeout"):
                await trio.to_thread.run_sync(send)
        await still_works(system, handler)
    assert handler.bodies == ["still working"]
