"""What a handler can throw at the runtime (issue 16), one class of input per section.

A handler is user code: it may raise an exception whose text SQLite cannot
store (a lone surrogate), whose ``__repr__`` or ``__str__`` raises, returns
something that is not a ``str`` or a megabyte; put such text in
``ctx.state``, ``ctx.send``, ``ctx.emit`` or its return value; use dict keys
that collide once json makes them strings; have a signature that cannot
take ``(ctx, msg)``; capture ``ctx.state`` in ``started()``; or give up on
a message with ``actors.Reject``. None of it may stop, hang or wedge the
system: the attempt fails (or the message is rejected), the other sessions
go on, and what is stored is readable.

Tests whose outcome depends on how the store runs SQLite run in both of its
modes (``store_clock``: inline under a MockClock, or the committer thread on
the real clock).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import HANG, drain, drain_nowait, rows

import actors
from actors._failure import MAX_REPORT_CHARS, MAX_SUMMARY_CHARS, WarningLimiter, describe
from actors.testing import fast_options, quiescent

SURROGATE = b"caf\xc3\xa9 \xff\xfe".decode("utf-8", "surrogateescape")  # 'café \udcff\udcfe'


@pytest.fixture
def clock(store_clock: trio.testing.MockClock | None) -> trio.testing.MockClock | None:
    """pytest-trio runs the test on this clock (None: the real one)."""
    return store_clock


def states(path: str) -> dict[str, Any]:
    return {s: json.loads(v) for s, v in rows(path, "SELECT session_id, value FROM state")}


# -- 1. text the store cannot encode ---------------------------------------------


class Odd(Exception):
    """Carries text decoded with errors="surrogateescape", as file names often are."""


async def raise_surrogate(ctx: actors.Context, msg: actors.Message) -> None:
    raise Odd(f"cannot open {SURROGATE}")


async def raise_with_surrogate_note(ctx: actors.Context, msg: actors.Message) -> None:
    exc = ValueError("plain")
    exc.add_note(SURROGATE)
    raise exc


async def raise_chained_surrogate(ctx: actors.Context, msg: actors.Message) -> None:
    try:
        raise OSError(2, "No such file", SURROGATE)
    except OSError as exc:
        raise RuntimeError("while reading") from exc


async def state_value(ctx: actors.Context, msg: actors.Message) -> None:
    ctx.state["name"] = SURROGATE


async def state_key(ctx: actors.Context, msg: actors.Message) -> None:
    ctx.state[SURROGATE] = 1


async def state_nested(ctx: actors.Context, msg: actors.Message) -> None:
    ctx.state["files"] = [{"path": SURROGATE}]


async def send_body(ctx: actors.Context, msg: actors.Message) -> None:
    ctx.send("other", {"path": SURROGATE})


# (handler, what the failed attempt's error says)
UNSTORABLE = [
    pytest.param(raise_surrogate, "Odd: cannot open café \\udcff\\udcfe", id="exception-message"),
    pytest.param(raise_with_surrogate_note, "\\udcff\\udcfe", id="exception-note"),
    pytest.param(raise_chained_surrogate, "\\udcff\\udcfe", id="exception-cause"),
    pytest.param(state_value, "ctx.state is not JSON-compatible", id="state-value"),
    pytest.param(state_key, "ctx.state is not JSON-compatible", id="state-key"),
    pytest.param(state_nested, "ctx.state is not JSON-compatible", id="state-nested"),
    pytest.param(send_body, "not valid Unicode", id="ctx-send-body"),
]


@pytest.mark.parametrize(("failing", "error"), UNSTORABLE)
async def test_text_the_store_cannot_encode_fails_only_that_attempt(
    db_path: str, store_clock: object, failing: Any, error: str
) -> None:
    """The attempt fails (dead-lettered after max_attempts, with its error
    escaped); the system, the session's next message and other sessions go on."""
    done: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "bad":
            await failing(ctx, msg)
            return
        ctx.state["ok"] = msg.body
        done.append(msg.body)

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=2)
    ) as system:
        events = system.events()
        await system.send("s", "bad")
        await system.send("s", "after")
        await system.send("t", "elsewhere")
        await drain(system)
        [letter] = system.dead_letters()
        stats = system.statistics()
        seen = drain_nowait(events)
    assert sorted(done) == ["after", "elsewhere"]
    assert (letter.body, letter.attempts) == ("bad", 2)
    assert error in letter.last_error
    letter.last_error.encode("utf-8")  # storable, and read back as it was stored
    assert (stats.failed_attempts, stats.dead) == (2, 1)
    # The failed attempts changed nothing: the state is what the others wrote.
    assert states(db_path) == {"s": {"ok": "after"}, "t": {"ok": "elsewhere"}}
    assert rows(db_path, "SELECT count(*) FROM messages WHERE state != 2") == [(0,)]
    [dead] = [e for e in seen if e.kind == "dead_lettered"]
    assert dead.detail is not None
    dead.detail.encode("utf-8")


async def test_text_the_store_never_sees_passes_through(db_path: str, store_clock: object) -> None:
    """Emitted values and ask replies stay in memory: any str is fine there."""

    async def handler(ctx: actors.Context, msg: actors.Message) -> str:
        await ctx.emit(SURROGATE)
        return SURROGATE + "!"

    async with actors.run_system(db_path, handler=handler) as system:
        async with system.subscribe("s") as outputs:
            with trio.fail_after(HANG):
                assert await system.ask("s", "hi") == SURROGATE + "!"
            assert outputs.receive_nowait() == SURROGATE
            assert outputs.receive_nowait() == SURROGATE + "!"
        await drain(system)
        assert system.statistics().processed == 1


# -- 2. a user exception that misbehaves -----------------------------------------


class Raising(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr() fails")

    def __str__(self) -> str:
        raise RuntimeError("str() fails")


class ReprRaises(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr() fails")


class NotStr(Exception):
    def __repr__(self) -> str:
        return 42  # type: ignore[return-value]

    def __str__(self) -> str:
        return None  # type: ignore[return-value]


class StrSubclass(str):
    def __str__(self) -> str:
        raise RuntimeError("the str subclass's own str() fails")


class ReprStrSubclass(Exception):
    def __repr__(self) -> str:
        return StrSubclass("a str subclass")


class Enormous(Exception):
    def __init__(self) -> None:
        super().__init__("x" * 5_000_000 + SURROGATE)


class Unbounded(Exception):
    def __repr__(self) -> str:
        return "r" * 5_000_000


class BaseStr(Exception):
    def __str__(self) -> str:
        raise KeyError("str() raises a KeyError")


# (exception type, what its summary shows)
MISBEHAVING = [
    pytest.param(Raising, "Raising (its repr() and str() failed)", id="repr-and-str-raise"),
    pytest.param(ReprRaises, "ReprRaises: ", id="repr-raises"),
    pytest.param(NotStr, "NotStr (its repr() and str() failed)", id="not-a-str"),
    pytest.param(ReprStrSubclass, "a str subclass", id="str-subclass"),
    pytest.param(Enormous, "Enormous('xxx", id="enormous-message"),
    pytest.param(Unbounded, "rrrr", id="enormous-repr"),
    pytest.param(BaseStr, "BaseStr()", id="str-raises-keyerror"),
]


@pytest.mark.parametrize(("exc_type", "summary"), MISBEHAVING)
async def test_an_exception_that_misbehaves_fails_only_its_attempt(
    db_path: str,
    store_clock: object,
    exc_type: type[Exception],
    summary: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dead-lettered, with events listened to and an ask waiting: nothing else
    calls its repr() or str(), and what is kept is bounded."""
    caplog.set_level(logging.DEBUG, logger="actors")  # (caplog's handler raises on a bad record)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "bad":
            raise exc_type()

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=2)
    ) as system:
        events = system.events()
        with pytest.raises(exc_type), trio.fail_after(HANG):
            await system.ask("s", "bad")
        await system.send("s", "after")
        await drain(system)
        [letter] = system.dead_letters()
        stats = system.statistics()
        seen = drain_nowait(events)
    assert (stats.processed, stats.dead, stats.failed_attempts) == (1, 1, 2)
    assert letter.attempts == 2
    # The exception's line names its type, whatever the message's size.
    lines = letter.last_error.splitlines()
    assert any(line.split(":")[0].endswith(f".{exc_type.__qualname__}") for line in lines)
    assert len(letter.last_error) <= MAX_REPORT_CHARS + 100
    details = [e.detail for e in seen if e.kind in ("dead_lettered", "actor_restarted")]
    assert len(details) == 3  # two restarts, one dead letter
    for detail in details:
        assert isinstance(detail, str)
        assert summary in detail
        assert len(detail) <= MAX_SUMMARY_CHARS + 100
    for record in caplog.records:
        assert len(record.getMessage()) <= MAX_REPORT_CHARS + 1000


async def test_hooks_raising_exceptions_that_misbehave(
    db_path: str, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    """started() and stopped() raising them: logged (bounded), restarted, going on."""
    caplog.set_level(logging.DEBUG, logger="actors")
    starts: list[int] = []

    class Hooks(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            starts.append(1)
            if len(starts) == 1:
                raise Raising()

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            pass

        async def stopped(self, ctx: actors.Context) -> None:
            raise Enormous()

    async with actors.run_system(
        db_path, handler=Hooks, **fast_options(idle_timeout=0.5)
    ) as system:
        events = system.events()
        await system.send("s", 1)
        with trio.fail_after(HANG):
            stats = await quiescent(system, passivated=True)
        seen = drain_nowait(events)
    # The failed start is charged to the session's head message (invariant
    # 5: a start that always fails must end in dead letters, not loop).
    assert (stats.processed, stats.failed_attempts) == (1, 1)
    assert len(starts) == 2
    [restarted] = [e for e in seen if e.kind == "actor_restarted"]
    assert restarted.detail == "Raising (its repr() and str() failed)"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("starting the actor of session 's' failed" in m for m in errors)
    assert any("stopped() hook of session 's' raised" in m for m in errors)
    assert all(len(m) <= MAX_REPORT_CHARS + 1000 for m in errors)


def test_describe_never_raises_and_bounds_what_it_returns() -> None:
    for exc in (Raising(), ReprRaises(), NotStr(), ReprStrSubclass(), Enormous(), Unbounded()):
        text = describe(exc)
        assert type(text.summary) is str and type(text.report) is str
        assert len(text.summary) <= MAX_SUMMARY_CHARS + 100
        assert len(text.report) <= MAX_REPORT_CHARS + 100
        text.report.encode("utf-8")
    assert describe(ValueError("plain")).summary == "ValueError('plain')"
    rejection = describe(actors.Reject(SURROGATE))
    assert rejection.summary == "rejected by the handler: café \\udcff\\udcfe"
    assert rejection.report.startswith(rejection.summary + "\n")
    cut = describe(Enormous()).report
    assert "characters cut" in cut and cut.endswith("\\udcff\\udcfe")  # the tail kept


# -- 3. Reject -------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["raised", "in-a-nursery"])
async def test_reject_dead_letters_at_once_without_retries(
    db_path: str, store_clock: object, nested: bool
) -> None:
    calls: list[tuple[Any, int]] = []

    async def reject(reason: str) -> None:
        raise actors.Reject(reason)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        calls.append((msg.body, msg.attempt))
        ctx.state["seen"] = ctx.state.get("seen", 0) + 1
        if msg.body == "unknown":
            ctx.send("audit", "must not be sent")
            if nested:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reject, "unknown command")
            await reject("unknown command")

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=5)
    ) as system:
        events = system.events()
        await system.send("s", "first")
        with pytest.raises((actors.Reject, ExceptionGroup)) as info, trio.fail_after(HANG):
            await system.ask("s", "unknown")
        await system.send("s", "after")
        await drain(system)
        [letter] = system.dead_letters()
        stats = system.statistics()
        seen = drain_nowait(events)
    assert actors.Reject in {type(e) for e in _leaves(info.value)}
    assert calls == [("first", 1), ("unknown", 1), ("after", 1)]  # no retry
    assert (letter.body, letter.attempts) == ("unknown", 1)
    assert letter.last_error.startswith("rejected by the handler: unknown command\n")
    assert "Traceback" in letter.last_error
    # A failed attempt: its state change and its ctx.send are not committed.
    assert states(db_path) == {"s": {"seen": 2}}
    assert rows(db_path, "SELECT count(*) FROM messages WHERE session_id = 'audit'") == [(0,)]
    # Not a crash: no restart counted, no backoff.
    assert (stats.processed, stats.dead, stats.failed_attempts, stats.restarts) == (2, 1, 1, 0)
    assert [e.kind for e in seen if e.kind in ("actor_restarted", "dead_lettered")] == [
        "dead_lettered"
    ]
    assert [e.detail for e in seen if e.kind == "dead_lettered"] == [
        "rejected by the handler: unknown command"
    ]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def test_reject_with_other_errors_in_a_group_is_an_ordinary_failure(
    db_path: str, autojump_clock: object
) -> None:
    async def fail(exc: Exception) -> None:
        raise exc

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.attempt == 1:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail, actors.Reject("no"))
                nursery.start_soon(fail, ValueError("something else"))

    async with actors.run_system(db_path, handler=handler, **fast_options()) as system:
        await system.send("s", 1)
        await drain(system)
        stats = system.statistics()
    assert (stats.processed, stats.dead, stats.failed_attempts) == (1, 0, 1)


def test_reject_needs_a_str_reason() -> None:
    with pytest.raises(TypeError, match="str"):
        actors.Reject(42)  # type: ignore[arg-type]
    assert actors.Reject("why").reason == "why"
    assert issubclass(actors.Reject, actors.ActorsError)


# -- 4. handlers whose signature cannot take (ctx, msg) ---------------------------


async def takes_msg_only(msg: actors.Message) -> None:
    pass  # pragma: no cover


async def takes_three(ctx: actors.Context, msg: actors.Message, extra: int) -> None:
    pass  # pragma: no cover


async def takes_keyword_only(ctx: actors.Context, msg: actors.Message, *, must: int) -> None:
    pass  # pragma: no cover


class HandleWithoutCtx(actors.Actor):
    async def handle(self, msg: actors.Message) -> None:  # type: ignore[override]
        pass  # pragma: no cover


class SyncHandle(actors.Actor):
    def handle(self, ctx: actors.Context, msg: actors.Message) -> None:  # type: ignore[override]
        pass  # pragma: no cover


class StartedWithoutCtx(actors.Actor):
    async def started(self) -> None:  # type: ignore[override]
        pass  # pragma: no cover

    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        pass  # pragma: no cover


class SyncStopped(actors.Actor):
    async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
        pass  # pragma: no cover

    def stopped(self, ctx: actors.Context) -> None:  # type: ignore[override]
        pass  # pragma: no cover


class CallableWithoutCtx:
    async def __call__(self, msg: actors.Message) -> None:
        pass  # pragma: no cover


async def two_and_one(ctx: actors.Context, msg: actors.Message, extra: int) -> None:
    pass  # pragma: no cover


BAD_SIGNATURES = [
    pytest.param(takes_msg_only, "takes_msg_only must take \\(ctx, msg\\)", id="msg-only"),
    pytest.param(takes_three, "takes_three must take", id="a-third-required"),
    pytest.param(takes_keyword_only, "must take", id="required-keyword-only"),
    pytest.param(HandleWithoutCtx, "HandleWithoutCtx.handle must take", id="actor-handle-msg"),
    pytest.param(SyncHandle, "SyncHandle.handle must be an async method", id="actor-sync-handle"),
    pytest.param(StartedWithoutCtx, "StartedWithoutCtx.started must take", id="actor-started"),
    pytest.param(SyncStopped, "SyncStopped.stopped must be an async method", id="sync-stopped"),
    pytest.param(CallableWithoutCtx(), "CallableWithoutCtx must take", id="callable-msg-only"),
    pytest.param(functools.partial(two_and_one, 1, 2), "must take", id="partial-two-bound"),
]


@pytest.mark.parametrize(("handler", "match"), BAD_SIGNATURES)
async def test_a_handler_that_cannot_take_ctx_and_msg_is_refused_at_run_system(
    tmp_path: Path, handler: object, match: str
) -> None:
    path = tmp_path / "a.db"
    with pytest.raises(TypeError, match=match):
        async with actors.run_system(path, handler=handler):  # type: ignore[arg-type]
            pytest.fail("the system started")
    assert os.listdir(tmp_path) == []  # refused before touching the file


async def with_defaults(ctx: actors.Context, msg: actors.Message, extra: int = 1) -> None:
    pass


async def star_args(*args: Any) -> None:
    pass


class HiddenSignature:
    """An async callable whose signature cannot be inspected: taken on trust."""

    __signature__ = "not a signature"

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> None:
        pass


class StaticHandle(actors.Actor):
    @staticmethod
    async def handle(ctx: actors.Context, msg: actors.Message) -> None:  # type: ignore[override]
        pass


GOOD_SIGNATURES = [
    pytest.param(with_defaults, id="extra-with-default"),
    pytest.param(star_args, id="star-args"),
    pytest.param(functools.partial(with_defaults, extra=2), id="partial"),
    pytest.param(HiddenSignature(), id="uninspectable"),
    pytest.param(StaticHandle, id="static-handle"),
]


@pytest.mark.parametrize("handler", GOOD_SIGNATURES)
async def test_handlers_that_can_take_ctx_and_msg_run(
    db_path: str, autojump_clock: object, handler: object
) -> None:
    async with actors.run_system(db_path, handler=handler) as system:  # type: ignore[arg-type]
        await system.send("s", 1)
        await drain(system)
        assert system.statistics().processed == 1


async def test_first_failures_are_warned_of_with_a_traceback_rate_limited(
    db_path: str, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken handler is never silent: the first failure of a message is a
    WARNING with its traceback, one per exception type per 10 s (the rest,
    and later attempts, INFO), and the next WARNING counts those held back."""
    caplog.set_level(logging.INFO, logger="actors")

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "type":
            raise TypeError("wrong type")
        if msg.body != "ok":
            raise ValueError(f"broken on {msg.body}")

    def warnings() -> list[str]:
        found = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "actors.supervisor"
        ]
        caplog.clear()
        return found

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=2)
    ) as system:
        await system.send_many([(f"s{i}", f"m{i}") for i in range(20)])
        await drain(system)
        first = warnings()
        assert len(first) == 1  # 20 first failures of one type, 20 second attempts
        assert "attempt 1 of message" in first[0] and "Traceback" in first[0]
        assert "ValueError: broken on m" in first[0]
        await system.send("t", "ok")
        await drain(system)
        assert warnings() == []
        await trio.sleep(10)  # the window passes
        await system.send("u", "late")
        await drain(system)
        [late] = warnings()
        assert "(19 more first failures held back since the last WARNING)" in late
        assert "ValueError: broken on late" in late
        await system.send("v", "type")  # another type: warned of in the same window
        await drain(system)
        [other] = warnings()
        assert "TypeError: wrong type" in other and "held back" not in other
        await system.send("w", "again")  # the first type again: held back, at INFO
        await drain(system)
        infos = [r for r in caplog.records if r.levelno == logging.INFO and "again" in r.message]
        assert warnings() == []
        assert len(infos) == 2  # both attempts of "again"
        assert system.statistics().failed_attempts == 2 * 23


def test_warning_limiter_one_per_kind_and_a_burst_in_all_per_window() -> None:
    limiter = WarningLimiter(interval=10.0, burst=3)
    assert [limiter.allow("a", 0.0), limiter.allow("a", 1.0), limiter.allow("b", 2.0)] == [
        0,
        None,
        1,
    ]
    assert limiter.allow("c", 3.0) == 0
    assert limiter.allow("d", 4.0) is None  # the burst is spent
    assert limiter.allow("a", 10.0) == 1  # a new window: says one was held back
    assert limiter.allow("a", 19.9) is None


# -- 5. dict keys that collide once made strings -----------------------------------

COLLIDING = [
    pytest.param({1: "a", "1": "b"}, id="int-and-str"),
    pytest.param({"outer": [{True: 1, "true": 2}]}, id="bool-nested-in-a-list"),
    pytest.param({None: 1, "null": 2}, id="none-and-str"),
    pytest.param({1.5: "a", "1.5": "b"}, id="float-and-str"),
    pytest.param(({-7: "a", "-7": "b"},), id="negative-int-in-a-tuple"),
]


@pytest.mark.parametrize("body", COLLIDING)
async def test_colliding_keys_are_refused_by_send(
    db_path: str, autojump_clock: object, body: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass  # pragma: no cover

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(TypeError, match=r"both .* in JSON"):
            await system.send("s", body)
    assert rows(db_path, "SELECT count(*) FROM messages") == [(0,)]


@pytest.mark.parametrize("where", ["state", "ctx.send"])
@pytest.mark.parametrize("body", COLLIDING)
async def test_colliding_keys_fail_the_attempt(
    db_path: str, autojump_clock: object, body: object, where: str
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if ctx.session_id != "s":
            return
        if where == "state":
            ctx.state["value"] = copy.deepcopy(body)
        else:
            ctx.send("other", body)

    async with actors.run_system(
        db_path, handler=handler, **fast_options(max_attempts=1)
    ) as system:
        await system.send("s", "go")
        await drain(system)
        [letter] = system.dead_letters()
    assert "TypeError" in letter.last_error and "in JSON" in letter.last_error
    assert states(db_path) == {}
    assert rows(db_path, "SELECT count(*) FROM messages WHERE state != 2") == [(0,)]


async def test_non_str_keys_that_do_not_collide_still_make_strings(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[Any] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)
        ctx.state.update({2: "two", 2.5: "float", "x": "str"})

    body = {1: "a", None: "n", 1.25: "f", "x": {'"1"': "quoted", "1": "one"}}
    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", body)
        await drain(system)
    assert seen == [{"1": "a", "null": "n", "1.25": "f", "x": {'"1"': "quoted", "1": "one"}}]
    assert states(db_path) == {"s": {"2": "two", "2.5": "float", "x": "str"}}


# -- 6. ctx.state kept from started() ----------------------------------------------


async def test_state_kept_from_started_is_the_state(db_path: str, store_clock: object) -> None:
    """A reference to ctx.state (or to a part of it) taken in started() and
    changed in handle() is committed, across messages and runs."""

    class Keeper(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            self.state = ctx.state
            self.log = ctx.state.setdefault("log", [])

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            self.state["count"] = self.state.get("count", 0) + 1
            self.log.append(msg.body)

    for run in range(2):
        async with actors.run_system(db_path, handler=Keeper, idle_timeout=0.05) as system:
            await system.send("s", f"{run}-a")
            await system.send("s", f"{run}-b")
            await drain(system)
            if run == 0:
                with trio.fail_after(HANG):  # passivated: a new incarnation for the next
                    await quiescent(system, passivated=True)
                await system.send("s", "0-c")
                await drain(system)
    assert states(db_path) == {"s": {"log": ["0-a", "0-b", "0-c", "1-a", "1-b"], "count": 5}}


async def test_state_kept_from_started_rolls_back_with_a_failed_attempt(
    db_path: str, autojump_clock: object
) -> None:
    class Keeper(actors.Actor):
        async def started(self, ctx: actors.Context) -> None:
            self.state = ctx.state

        async def handle(self, ctx: actors.Context, msg: actors.Message) -> None:
            self.state["total"] = self.state.get("total", 0) + msg.body
            if msg.attempt == 1 and msg.body == 10:
                raise ValueError("after changing the state")

    async with actors.run_system(db_path, handler=Keeper, **fast_options()) as system:
        for value in (1, 10, 100):
            await system.send("s", value)
        await drain(system)
    assert states(db_path) == {"s": {"total": 111}}  # each once
