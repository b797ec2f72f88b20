"""The HTTP API (actors.http) through a real server on 127.0.0.1.

Each test runs a system and hypercorn's trio worker in the test's own trio
run, on a free port, and talks to it with httpx (async, on trio through
anyio). The clock is a MockClock that never moves by itself (rate 0, no
autojump: a jump would fire the server's keep-alive timeouts while the
client waits on a socket); a test moves it where time matters (delays,
ask timeouts). Nothing sleeps to wait: handlers signal with trio Events.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

import actors
import actors.http

TOKEN = "all-" + "a" * 28
READ = "read-" + "r" * 27
ADMIN = "admin-" + "d" * 26
SEND = "send-" + "s" * 27


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@attrs.define
class Handler:
    """A handler that records what it ran and does what the body says."""

    ran: list[tuple[str, Any]] = attrs.field(factory=list)
    started: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    emitted: int = 0

    async def __call__(self, ctx: actors.Context, msg: actors.Message) -> Any:
        body = msg.body
        self.ran.append((msg.session_id, body))
        self.started.set()
        if isinstance(body, dict):
            if body.get("wait"):
                await self.release.wait()
            for n in range(body.get("emit_many", 0)):
                await ctx.emit([n, "x" * 10_000])
                self.emitted += 1
            if "raise" in body:
                raise ValueError(body["raise"])
            if "emit" in body:
                for value in body["emit"]:
                    await ctx.emit(value)
            return body.get("reply")
        return None


@attrs.define
class Served:
    system: actors.System
    api: actors.http.HttpApp
    client: httpx.AsyncClient
    handler: Handler
    url: str

    async def post(self, path: str, body: Any, token: str = TOKEN, **kw: Any) -> httpx.Response:
        return await self.client.post(path, json=body, headers=auth(token) | kw)

    async def get(self, path: str, token: str = TOKEN) -> httpx.Response:
        return await self.client.get(path, headers=auth(token))


@pytest.fixture
def mock() -> trio.testing.MockClock:
    return trio.testing.MockClock()  # rate 0: time moves only when a test jumps it


@pytest.fixture
def options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def served(
    tmp_path: Path, mock: trio.testing.MockClock, options: dict[str, Any]
) -> AsyncIterator[Served]:
    handler = Handler()
    async with actors.run_system(str(tmp_path / "app.db"), handler=handler, **options) as system:
        api = actors.http.app(
            system, token=TOKEN, read_token=READ, admin_token=ADMIN, tokens={SEND: "send"}
        )
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            start = partial(actors.http.serve, api, port=0, shutdown_trigger=stop.wait)
            binds = await nursery.start(start)
            async with httpx.AsyncClient(base_url=binds[0]) as client:
                yield Served(system, api, client, handler, binds[0])
            stop.set()


# -- sending and asking -------------------------------------------------------------


async def test_send_answers_202_with_the_id_of_a_durable_message(served: Served) -> None:
    response = await served.post("/v1/sessions/s-1/messages", {"body": {"n": 1}})
    assert response.status_code == 202
    message_id = response.json()["id"]
    assert served.system.statistics().sends == 1  # durable before the answer
    await served.system.drain()
    assert served.handler.ran == [("s-1", {"n": 1})]
    again = await served.post("/v1/sessions/s-1/messages", {"body": 2}, token=SEND)
    assert again.status_code == 202
    assert again.json()["id"] > message_id


async def test_idempotency_key_header_sends_once(served: Served) -> None:
    first = await served.post("/v1/sessions/s/messages", {"body": 1}, **{"Idempotency-Key": "k1"})
    second = await served.post("/v1/sessions/s/messages", {"body": 1}, **{"Idempotency-Key": "k1"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    await served.system.drain()
    assert served.handler.ran == [("s", 1)]


async def test_a_session_id_with_a_slash_is_addressed_encoded(served: Served) -> None:
    response = await served.post("/v1/sessions/user%2F7/messages", {"body": "x"})
    assert response.status_code == 202
    await served.system.drain()
    assert served.handler.ran == [("user/7", "x")]


async def test_delay_holds_the_message_back(served: Served, mock: trio.testing.MockClock) -> None:
    response = await served.post("/v1/sessions/s/messages", {"body": 1, "delay": 5})
    assert response.status_code == 202
    await trio.testing.wait_all_tasks_blocked()
    assert served.handler.ran == []
    mock.jump(5)
    await served.system.drain()
    assert served.handler.ran == [("s", 1)]


async def test_ask_answers_with_the_handlers_return_value(served: Served) -> None:
    response = await served.post("/v1/sessions/s/ask", {"body": {"reply": {"ok": [1, 2]}}})
    assert response.status_code == 200
    assert response.json() == {"ok": [1, 2]}


async def test_ask_times_out_with_504_and_the_message_is_still_processed(
    served: Served, mock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(
                await served.post("/v1/sessions/s/ask", {"body": {"wait": 1}, "timeout": 2})
            )

        nursery.start_soon(ask)
        await served.handler.started.wait()
        mock.jump(2)
    assert answers[0].status_code == 504
    assert "error" in answers[0].json()
    served.handler.release.set()
    await served.system.drain()
    assert served.system.statistics().processed == 1


@pytest.mark.parametrize("options", [{"max_attempts": 1}])
async def test_ask_of_a_dead_lettered_message_is_409(served: Served) -> None:
    async with trio.open_nursery() as nursery:
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await served.post("/v1/sessions/s/ask", {"body": {"wait": 1}}))

        nursery.start_soon(ask)
        await served.handler.started.wait()
        assert served.system.kill("s")
    assert answers[0].status_code == 409
    assert "dead" in answers[0].json()["error"]


async def test_ask_of_a_handler_that_raises_is_500_with_its_error(served: Served) -> None:
    response = await served.post("/v1/sessions/s/ask", {"body": {"raise": "boom"}})
    assert response.status_code == 500
    assert response.json() == {"error": "the handler raised ValueError: boom"}


# -- streams --------------------------------------------------------------------------


async def read_events(lines: AsyncIterator[str], count: int) -> list[tuple[str, Any]]:
    """The next ``count`` events of an SSE response's lines (comments skipped)."""
    events: list[tuple[str, Any]] = []
    kind = None
    async for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind or "message", json.loads(line[len("data: ") :])))
            if len(events) == count:
                break
    return events


async def test_stream_gives_a_sessions_outputs_as_server_sent_events(served: Served) -> None:
    async with served.client.stream("GET", "/v1/sessions/s/stream", headers=auth(READ)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        assert await lines.__anext__() == ": stream open"
        sent = await served.post("/v1/sessions/s/messages", {"body": {"emit": [1, {"a": 2}]}})
        assert sent.status_code == 202
        events = await read_events(lines, 2)
        assert events == [("output", 1), ("output", {"a": 2})]
        assert served.api.statistics().open_streams == 1
        served.api.stop()  # a graceful stop ends the streams
        assert await read_events(lines, 1) == [("end", {})]
    await trio.testing.wait_all_tasks_blocked()
    assert served.api.statistics().open_streams == 0


async def test_stream_has_backpressure(served: Served) -> None:
    # A buffer of 1 and a reader that does not read: the actor waits in emit,
    # so the session's message is not acknowledged while the stream is full.
    async with served.client.stream(
        "GET", "/v1/sessions/s/stream?buffer=1", headers=auth(READ)
    ) as response:
        lines = response.aiter_lines()
        assert await lines.__anext__() == ": stream open"
        # 200 MB of events: more than the sockets' buffers hold.
        await served.post("/v1/sessions/s/messages", {"body": {"emit_many": 20_000}})
        await served.handler.started.wait()
        await trio.testing.wait_all_tasks_blocked()
        held = served.handler.emitted
        assert held < 20_000
        assert served.system.statistics().in_flight == 1
        assert served.system.statistics().processed == 0
        events = await read_events(lines, 2 * held)  # reading lets it go on, in order
        assert [value[0] for _, value in events] == list(range(2 * held))
        await trio.testing.wait_all_tasks_blocked()
        assert 2 * held <= served.handler.emitted < 20_000
    await served.system.drain()  # the stream closed: the handler no longer waits
    assert served.system.statistics().processed == 1


async def test_events_streams_status_events(served: Served) -> None:
    async with served.client.stream("GET", "/v1/events", headers=auth(TOKEN)) as response:
        lines = response.aiter_lines()
        assert await lines.__anext__() == ": stream open"
        await served.post("/v1/sessions/s/messages", {"body": 1})
        kind, event = "backlog", {}
        while kind == "backlog":  # (one comes at once, for a new subscriber)
            (kind, event), *_ = await read_events(lines, 1)
        assert kind == "actor_started"
        assert event["session_id"] == "s"


# -- reading and operating ---------------------------------------------------------------


async def test_status_has_the_statistics_fields_and_health(served: Served) -> None:
    await served.post("/v1/sessions/s/messages", {"body": 1})
    await served.system.drain()
    response = await served.get("/v1/status", token=READ)
    assert response.status_code == 200
    status = response.json()
    fields = {f.name for f in attrs.fields(actors.SystemStatistics)}
    assert fields <= set(status)
    assert status["processed"] == 1
    assert status["sends"] == 1
    assert status["health"]["healthy"] is True
    assert status["closed"] is False


async def test_sessions_are_listed_deepest_first_and_paged(served: Served) -> None:
    served.handler.release = trio.Event()
    await served.post("/v1/sessions/busy/messages", {"body": {"wait": 1}})
    await served.handler.started.wait()
    for n in range(3):
        await served.post("/v1/sessions/busy/messages", {"body": n})
    await served.post("/v1/sessions/other/messages", {"body": {"wait": 1}})
    page = (await served.get("/v1/sessions?limit=1", token=READ)).json()
    assert page["total"] == 2
    assert [row["session_id"] for row in page["sessions"]] == ["busy"]
    assert page["sessions"][0]["pending"] + page["sessions"][0]["handed"] == 3
    second = (await served.get("/v1/sessions?limit=1&offset=1", token=READ)).json()
    assert [row["session_id"] for row in second["sessions"]] == ["other"]
    served.handler.release.set()
    await served.system.drain()


@pytest.mark.parametrize("options", [{"max_attempts": 1}])
async def test_dead_letters_list_retry_and_abort(served: Served) -> None:
    for n in range(3):
        await served.post(f"/v1/sessions/s{n}/messages", {"body": {"raise": f"bad {n}"}})
    await served.system.drain()
    page = (await served.get("/v1/dead-letters?limit=2", token=READ)).json()
    assert page["total"] == 3
    assert len(page["dead_letters"]) == 2
    first = page["dead_letters"][0]
    assert "ValueError: bad 0" in first["last_error"]
    rest = (await served.get("/v1/dead-letters?offset=2", token=READ)).json()["dead_letters"]
    assert [d["session_id"] for d in rest] == ["s2"]

    retried = await served.post("/v1/dead-letters/retry", {"ids": [first["id"], 999]}, ADMIN)
    assert retried.status_code == 200
    assert retried.json() == {"retried": 1, "not_dead": [999]}
    await served.system.drain()
    aborted = await served.post(f"/v1/messages/{rest[0]['id']}/abort", {}, ADMIN)
    assert aborted.status_code == 200
    assert (await served.post(f"/v1/messages/{rest[0]['id']}/abort", {}, ADMIN)).status_code == 404
    everything = await served.post("/v1/dead-letters/retry", {"all": True}, TOKEN)
    assert everything.json() == {
        "retried": 2,
        "not_dead": [],
    }  # the first failed again, and the second
    await served.system.drain()


async def test_abort_of_a_message_in_flight_is_409(served: Served) -> None:
    sent = await served.post("/v1/sessions/s/messages", {"body": {"wait": 1}})
    await served.handler.started.wait()
    response = await served.post(f"/v1/messages/{sent.json()['id']}/abort", {}, ADMIN)
    assert response.status_code == 409
    served.handler.release.set()
    await served.system.drain()


async def test_healthz_needs_no_token_and_says_503_once_stopping(served: Served) -> None:
    response = await served.client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["healthy"] is True
    served.api.stop()
    response = await served.client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["healthy"] is False


async def test_metrics_are_prometheus_text(served: Served) -> None:
    await served.post("/v1/sessions/s/messages", {"body": 1})
    await served.system.drain()
    response = await served.get("/metrics", token=READ)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "actors_processed_messages_total 1.0" in response.text
    assert "actors_handler_duration_seconds_count 1.0" in response.text


async def test_statistics_count_requests_by_status(served: Served) -> None:
    await served.post("/v1/sessions/s/messages", {"body": 1})
    await served.client.get("/v1/status")
    await served.get("/v1/dead-letters/retry", token=READ)
    stats = served.api.statistics()
    assert stats.by_status == {202: 1, 401: 1, 405: 1}
    assert stats.requests == 3
    assert stats.unauthorized == 1
    assert stats.open_streams == 0


# -- refusals ----------------------------------------------------------------------------

HUGE = "x" * (1 << 20)
DEEP = "[" * 200 + "]" * 200

# (method, path, token, body (bytes, or JSON), status, text in the error)
BAD: list[tuple[str, str, str | None, Any, int, str]] = [
    ("POST", "/v1/sessions/s/messages", TOKEN, b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/sessions/s/messages", TOKEN, b"", 400, "not valid JSON"),
    ("POST", "/v1/sessions/s/messages", TOKEN, b'{"body": NaN}', 400, "not valid JSON"),
    ("POST", "/v1/sessions/s/messages", TOKEN, b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/v1/sessions/s/messages", TOKEN, [1, 2], 400, "JSON object"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"bdy": 1}, 400, "no 'body'"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"body": 1, "x": 2}, 400, "unknown field"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"body": 1, "delay": "5"}, 400, "'delay'"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"body": 1, "delay": True}, 400, "'delay'"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"body": 1, "delay": -1}, 400, "'delay'"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"body": 1, "delay": 1e300}, 400, "'delay'"),
    ("POST", "/v1/sessions/s/messages", TOKEN, DEEP.encode(), 400, "nested deeper"),
    ("POST", "/v1/sessions/s/messages", TOKEN, b"[" * 100_000, 400, "nested deeper"),
    ("POST", "/v1/sessions/s/messages", TOKEN, {"body": HUGE}, 413, "max_message_bytes"),
    ("POST", "/v1/sessions/s/messages", TOKEN, b" " * (2 << 20), 413, "over"),
    ("POST", "/v1/sessions/s/ask", TOKEN, {"body": 1, "timeout": 1e9}, 400, "'timeout'"),
    ("POST", "/v1/sessions/s/ask", TOKEN, {"body": 1, "delay": 1}, 400, "unknown field"),
    ("POST", "/v1/sessions//messages", TOKEN, {"body": 1}, 400, "bad session id"),
    ("POST", "/v1/sessions/a%00b/messages", TOKEN, {"body": 1}, 400, "bad session id"),
    ("POST", f"/v1/sessions/{'s' * 257}/messages", TOKEN, {"body": 1}, 400, "bad session id"),
    ("POST", "/v1/messages/0/abort", ADMIN, None, 404, "no message"),
    ("POST", "/v1/messages/abc/abort", ADMIN, None, 404, "no message"),
    ("POST", f"/v1/messages/{2**63}/abort", ADMIN, None, 404, "no message"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {}, 400, "exactly one"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {"all": False}, 400, "exactly one"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {"ids": [1], "all": True}, 400, "exactly one"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {"ids": []}, 400, "list of 1"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {"ids": [0]}, 400, "message ids"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {"ids": ["1"]}, 400, "message ids"),
    ("POST", "/v1/dead-letters/retry", ADMIN, {"ids": [True]}, 400, "message ids"),
    ("GET", "/v1/sessions?limit=0", READ, None, 400, "'limit'"),
    ("GET", "/v1/sessions?limit=abc", READ, None, 400, "'limit'"),
    ("GET", "/v1/sessions?offset=-1", READ, None, 400, "'offset'"),
    ("GET", "/v1/dead-letters?limit=100000", READ, None, 400, "'limit'"),
    ("GET", "/v1/dead-letters?session=", READ, None, 400, "bad session"),
    ("GET", "/v1/sessions/s/stream?buffer=0", READ, None, 400, "'buffer'"),
    # tokens and roles
    ("GET", "/v1/status", None, None, 401, "valid token"),
    ("GET", "/v1/status", "wrong-" + "w" * 26, None, 401, "valid token"),
    ("GET", "/v1/status", TOKEN + "x", None, 401, "valid token"),
    ("GET", "/v1/status", TOKEN[:-1], None, 401, "valid token"),
    ("GET", "/metrics", None, None, 401, "valid token"),
    ("POST", "/v1/dead-letters/retry", READ, {"all": True}, 403, "read token may not admin"),
    ("POST", "/v1/messages/1/abort", READ, None, 403, "read token may not admin"),
    ("POST", "/v1/sessions/s/messages", READ, {"body": 1}, 403, "read token may not send"),
    ("POST", "/v1/sessions/s/messages", ADMIN, {"body": 1}, 403, "an admin token may not send"),
    ("POST", "/v1/dead-letters/retry", SEND, {"all": True}, 403, "send token may not admin"),
    ("GET", "/v1/status", SEND, None, 403, "send token may not read"),
    ("GET", "/v1/sessions/s/stream", SEND, None, 403, "send token may not read"),
    # routes and methods
    ("GET", "/v1/nothing", TOKEN, None, 404, "no such route"),
    ("GET", "/v2/status", TOKEN, None, 404, "no such route"),
    ("DELETE", "/v1/status", TOKEN, None, 405, "method not allowed"),
    ("GET", "/v1/sessions/s/messages", TOKEN, None, 405, "method not allowed"),
    ("OPTIONS", "/v1/status", None, None, 405, "method not allowed"),
]


@pytest.mark.parametrize(("method", "path", "token", "body", "status", "text"), BAD)
async def test_bad_requests_get_a_clear_json_error(
    served: Served, method: str, path: str, token: str | None, body: Any, status: int, text: str
) -> None:
    headers = {} if token is None else auth(token)
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    response = await served.client.request(method, path, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert text in error
    assert "Traceback" not in response.text
    for secret in (TOKEN, READ, ADMIN, SEND):
        assert secret not in response.text
    assert "access-control-allow-origin" not in response.headers
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    assert served.system.statistics().sends == 0


async def test_a_chunked_body_over_the_limit_is_cut_off(served: Served) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b" " * 65536

    response = await served.client.post(
        "/v1/sessions/s/messages", content=chunks(), headers=auth(TOKEN)
    )
    assert response.status_code == 413


BAD_APPS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({}, ValueError, "at least one token"),
    ({"token": "short"}, ValueError, "16 to 1024"),
    ({"token": "x" * 20 + " y"}, ValueError, "letters, digits"),
    ({"token": 12345678901234567}, TypeError, "must be a str"),
    ({"token": TOKEN, "read_token": TOKEN}, ValueError, "two roles"),
    ({"tokens": {TOKEN: "root"}}, ValueError, "root"),
    ({"token": TOKEN, "stall_after": 0}, ValueError, "stall_after"),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD_APPS)
async def test_app_refuses_bad_tokens(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    async with actors.run_system(str(tmp_path / "a.db"), handler=Handler()) as system:
        with pytest.raises(error, match=text):
            actors.http.app(system, **kwargs)


def test_token_lines_give_roles_and_ignore_trailing_whitespace() -> None:
    Role = actors.http.Role
    lines = [
        f"{TOKEN}  \n",
        "\n",
        "# a comment\n",
        f"read:{READ}\t\n",
        f"send:{SEND}",
        f"admin:{ADMIN}",
    ]
    assert actors.http.parse_token_lines(lines) == {
        TOKEN: Role.ALL,
        READ: Role.READ,
        SEND: Role.SEND,
        ADMIN: Role.ADMIN,
    }
    with pytest.raises(ValueError, match="line 2: a token must be 16") as info:
        actors.http.parse_token_lines([TOKEN, "read:short"])
    assert "read:" not in str(info.value)
    with pytest.raises(ValueError, match="line 2: this token was given before"):
        actors.http.parse_token_lines([TOKEN, f"admin:{TOKEN}"])


def test_import_actors_does_not_import_starlette() -> None:
    code = (
        "import sys, actors, actors._cli\n"
        "assert 'starlette' not in sys.modules and 'hypercorn' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


async def test_the_app_mounted_under_a_prefix_serves_its_dashboard_and_api(
    tmp_path: Path,
) -> None:
    """Mounted in another Starlette application under /actors: the dashboard's
    files and the API are there (its script asks the API by relative URLs)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    async with actors.run_system(str(tmp_path / "m.db"), handler=Handler()) as system:
        outer = Starlette(routes=[Mount("/actors", app=actors.http.app(system, token=TOKEN))])
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path in ("/actors/", "/actors/dashboard.js", "/actors/dashboard.css"):
                assert (await client.get(path)).status_code == 200, path
            script = (await client.get("/actors/dashboard.js")).text
            assert '"/v1' not in script and "`/v1" not in script
            status = await client.get("/actors/v1/status", headers=auth(TOKEN))
            assert status.status_code == 200 and status.json()["pending"] == 0
