"""``actors serve``: the system and its HTTP API in one process, as a subprocess.

The server is a separate OS process, so these tests poll it, with a
deadline (its startup line on stderr, its status while a handler runs);
nothing in them sleeps a fixed time.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "serve-" + "t" * 26
READ = "reader-" + "r" * 25
DEADLINE = 30.0

HANDLERS = """
import trio

async def handle(ctx, msg):
    if isinstance(msg.body, dict) and "slow" in msg.body:
        await trio.sleep(msg.body["slow"])
    return {"echo": msg.body}
"""


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.lines = lines

    def stop(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=DEADLINE)
        return self.proc.returncode, "".join(self.lines) + err


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _command(*args: str, target: str = "app.db") -> list[str]:
    return [sys.executable, "-m", "actors", "serve", target, *args]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[object]:
    (tmp_path / "app_handlers.py").write_text(HANDLERS)
    started: list[subprocess.Popen[str]] = []

    def run(*args: str, target: str = "app.db") -> Server:
        command = _command("--handler", "app_handlers:handle", "--port", "0", *args, target=target)
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=_env(), stderr=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
            line = proc.stderr.readline() if ready else ""
            lines.append(line)
            if " on http://" in line:
                return Server(proc, line.rsplit(" on ", 1)[1].strip(), lines)
            if not line and proc.poll() is not None:
                break
        raise AssertionError(f"the server did not start: {''.join(lines)}")

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _status(tmp_path: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "actors", "status", "app.db", "--json"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    status: dict[str, object] = json.loads(out.stdout)
    return status


def test_serve_answers_with_the_token_files_roles_and_stops_on_sigterm(
    tmp_path: Path, start: object
) -> None:
    (tmp_path / "tokens").write_text(f"{TOKEN}   \nread:{READ}\n")
    server = start("--token-file", "tokens", "--max-attempts", "1")  # type: ignore[operator]
    with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
        everything = {"Authorization": f"Bearer {TOKEN}"}
        reader = {"Authorization": f"Bearer {READ}"}
        sent = client.post("/v1/sessions/s/messages", json={"body": 1}, headers=everything)
        assert sent.status_code == 202
        asked = client.post("/v1/sessions/s/ask", json={"body": 2}, headers=everything)
        assert asked.status_code == 200
        assert asked.json() == {"echo": 2}
        refused = client.post("/v1/sessions/s/messages", json={"body": 3}, headers=reader)
        assert refused.status_code == 403
        assert client.get("/v1/status", headers=reader).json()["processed"] == 2
        # A handler running at SIGTERM finishes, and its ack commits.
        slow = client.post(
            "/v1/sessions/t/messages", json={"body": {"slow": 1}}, headers=everything
        )
        assert slow.status_code == 202
        deadline = time.monotonic() + DEADLINE
        while client.get("/v1/status", headers=reader).json()["in_flight"] != 1:
            assert time.monotonic() < deadline
    code, err = server.stop(signal.SIGTERM)
    assert code == 0, err
    assert "SIGTERM: stopping" in err
    assert "stopped" in err
    assert TOKEN not in err and READ not in err
    status = _status(tmp_path)
    assert status["pending"] == 0
    assert status["dead"] == 0


def test_serve_without_tokens_writes_one_readable_by_its_owner_only(
    tmp_path: Path, start: object
) -> None:
    server = start()  # type: ignore[operator]
    token_file = tmp_path / "app.db.token"
    assert "app.db.token" in "".join(server.lines)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert token not in "".join(server.lines)
    with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/status").status_code == 401
        ok = client.get("/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        # A second serve of the same database fails on its lock, and leaves
        # the running server's token as it was.
        second = subprocess.run(
            _command("--handler", "app_handlers:handle", "--port", "0"),
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert second.returncode == 1 and "already in use" in second.stderr, second.stderr
        assert token_file.read_text().strip() == token
    code, err = server.stop(signal.SIGINT)
    assert code == 0, err
    assert "SIGINT: stopping" in err
    # A restart keeps the token: a client that saved it goes on working.
    again = start()  # type: ignore[operator]
    assert "the token is in app.db.token" in "".join(again.lines)
    assert token_file.read_text().strip() == token
    with httpx.Client(base_url=again.url, timeout=DEADLINE) as client:
        ok = client.get("/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    code, err = again.stop(signal.SIGTERM)
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--handler", "nowhere_at_all:handle"], "cannot import"),
        (["--handler", "app_handlers"], "package.module:function"),
        (["--handler", "app_handlers:missing"], "has no 'missing'"),
        (["--handler", "app_handlers:handle", "--token-file", "absent"], "cannot read it"),
        (["--handler", "app_handlers:handle", "--token-file", "short"], "line 1"),
        (["--handler", "app_handlers:handle", "--max-attempts", "0"], "max-attempts"),
        (["--handler", "app_handlers:handle", "--lease-ttl", "5"], "PostgreSQL only"),
    ],
)
def test_serve_refuses_bad_arguments(tmp_path: Path, args: list[str], text: str) -> None:
    (tmp_path / "app_handlers.py").write_text(HANDLERS)
    (tmp_path / "short").write_text("read:abc\n")
    result = subprocess.run(
        _command("--port", "0", *args),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 2, result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_a_slow_client_loses_its_connection(tmp_path: Path, start: object) -> None:
    """A client that stops in the middle of its request (slowloris) is cut
    after --read-timeout, and the server goes on serving the others."""
    import socket
    from urllib.parse import urlsplit

    (tmp_path / "tokens").write_text(TOKEN + "\n")
    server = start("--token-file", "tokens", "--read-timeout", "0.5")  # type: ignore[operator]
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=DEADLINE) as slow:
        # Headers whole (hypercorn's keep-alive timeout cuts a stall in
        # them), then part of the body, then nothing.
        slow.sendall(
            b"POST /v1/sessions/s/messages HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            + b'{"body": '
        )
        answer = slow.recv(4096)  # (blocks until the server answers or closes)
    # (Cut: either closed at once, or told why first.)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
    with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
        sent = client.post(
            "/v1/sessions/s/messages",
            json={"body": 1},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert sent.status_code == 202
    code, err = server.stop(signal.SIGTERM)
    assert code == 0, err


def test_serve_on_a_postgresql_url(tmp_path: Path, start: object, pg_url: str) -> None:
    """The same server on a cluster's database: sends, asks and status, and a
    graceful stop that leaves nothing behind."""
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    server = start("--token-file", "tokens", "--lease-ttl", "2", target=pg_url)  # type: ignore[operator]
    everything = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=DEADLINE, headers=everything) as client:
        for n in range(5):
            assert client.post(f"/v1/sessions/p{n}/messages", json={"body": n}).status_code == 202
        asked = client.post("/v1/sessions/p0/ask", json={"body": "hello"})
        assert asked.status_code == 200 and asked.json() == {"echo": "hello"}
        deadline = time.monotonic() + DEADLINE
        while client.get("/v1/status").json()["processed"] != 6:
            assert time.monotonic() < deadline
        sessions = client.get("/v1/sessions").json()
        assert sessions["total"] == 0  # (every message handled)
    code, err = server.stop(signal.SIGTERM)
    assert code == 0, err
    assert "serving postgresql://" in err
    assert TOKEN not in err


def test_a_port_in_use_is_said_with_its_address(tmp_path: Path) -> None:
    import socket

    (tmp_path / "app_handlers.py").write_text(HANDLERS)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            _command("--handler", "app_handlers:handle", "--port", str(port)),
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
