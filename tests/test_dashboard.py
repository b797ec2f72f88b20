"""The dashboard in a real headless Chromium, against ``actors serve``.

The server is a separate OS process and the browser another: the test waits
for what the page shows with selenium's WebDriverWait (polling with a
deadline), and nothing sleeps a fixed time. ``ACTORS_SCREENSHOT=PATH`` saves
the page with its dead letter (docs/dashboard.png is made so).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import HINT, chromium, find

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "dashboard-" + "t" * 22
DEADLINE = 30.0

# A message {"fail": ...} fails its first run (max_attempts=1: a dead letter)
# and succeeds when retried: the retry button's effect is visible.
HANDLERS = """
failed = set()

async def handle(ctx, msg):
    if isinstance(msg.body, dict) and "fail" in msg.body and msg.id not in failed:
        failed.add(msg.id)
        raise ValueError(msg.body["fail"])
    return msg.body
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    found = find()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(HINT, pytrace=False)
        pytest.skip(HINT)
    with chromium(*found, width=420, height=1400) as session:  # (a phone's width)
        yield session


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "dash_handlers.py").write_text(HANDLERS)
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    command = [sys.executable, "-m", "actors", "serve", "app.db", "--port", "0"]
    command += ["--handler", "dash_handlers:handle", "--token-file", "tokens"]
    command += ["--max-attempts", "1"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield _address(proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=DEADLINE)


def _address(proc: subprocess.Popen[str]) -> str:
    """The URL from the server's startup line (polled with a deadline)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + DEADLINE
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
        line = proc.stderr.readline() if ready else ""
        seen.append(line)
        if " on http://" in line:
            return line.rsplit(" on ", 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError("actors serve did not start:\n" + "".join(seen))


def test_the_dashboard_shows_work_live_and_retries_a_dead_letter(server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, DEADLINE)

    def text(element_id: str) -> str:
        return str(browser.find_element(By.ID, element_id).text)

    browser.get(server + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait.until(lambda _: text("c-processed") == "0")
    wait.until(lambda _: text("health") == "healthy")
    assert not browser.find_element(By.ID, "login").is_displayed()

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server, headers=headers) as api:
        for n in range(3):
            assert api.post("/v1/sessions/s1/messages", json={"body": n}).status_code == 202
        wait.until(lambda _: text("c-processed") == "3")  # (no reload)
        reply = api.post("/v1/sessions/s2/messages", json={"body": {"fail": "boom"}})
        assert reply.status_code == 202
        dead_id = reply.json()["id"]

    row = f'#dead tbody tr[data-id="{dead_id}"]'
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, row))
    assert "ValueError: boom" in browser.find_element(By.CSS_SELECTOR, row).text
    assert text("c-dead") == "1"
    wait.until(lambda _: "actor_restarted" in text("events") or "s2" in text("events"))

    if os.environ.get("ACTORS_SCREENSHOT"):
        browser.save_screenshot(os.environ["ACTORS_SCREENSHOT"])
    browser.find_element(By.CSS_SELECTOR, f"{row} button.retry").click()
    wait.until(lambda _: not browser.find_elements(By.CSS_SELECTOR, row))
    wait.until(lambda _: text("c-processed") == "4" and text("c-dead") == "0")

    with httpx.Client(base_url=server, headers=headers) as api:
        reply = api.post("/v1/sessions/s3/messages", json={"body": {"fail": "again"}})
        aborted = f'#dead tbody tr[data-id="{reply.json()["id"]}"]'
    wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, aborted))
    browser.find_element(By.CSS_SELECTOR, f"{aborted} button.abort").click()
    wait.until(lambda _: not browser.find_elements(By.CSS_SELECTOR, aborted))
    wait.until(lambda _: text("c-dead") == "0")
    assert text("c-processed") == "4"  # (aborted: never run again)

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_wrong_token_brings_the_form_back(server: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    browser.find_element(By.ID, "token").send_keys("wrong-" + "w" * 26)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    WebDriverWait(browser, DEADLINE).until(
        lambda _: (
            browser.find_element(By.ID, "login").is_displayed()
            and "refused" in browser.find_element(By.ID, "status-line").text
        )
    )
    assert not browser.find_element(By.ID, "board").is_displayed()


def test_the_dashboard_files_need_no_token_and_load_nothing_from_elsewhere(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for path, kind in [
            ("/", "text/html"),
            ("/dashboard.js", "text/javascript"),
            ("/dashboard.css", "text/css"),
        ]:
            reply = client.get(path)
            assert reply.status_code == 200, path
            assert reply.headers["content-type"].startswith(kind)
            policy = reply.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        page = client.get("/").text
        assert "http://" not in page and "https://" not in page  # (no CDN, no font)
        assert client.get("/v1/status").status_code == 401
