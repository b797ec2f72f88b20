"""A headless Chromium for the dashboard's tests, driven by selenium.

Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs
them): a browser that downloads its own build cannot be fetched on the
machines this project is tested on. Without them (a laptop), the tests that
use the browser skip with one line saying how to get it; under ``CI`` they
fail instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HINT = (
    "no Chromium for the dashboard's tests: apt-get install chromium chromium-driver"
    " (and pip install selenium), or set ACTORS_CHROMIUM and ACTORS_CHROMEDRIVER"
)


def find() -> tuple[str, str] | None:
    """The browser and its driver, if this machine has both (and selenium)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    browser = os.environ.get("ACTORS_CHROMIUM") or shutil.which("chromium")
    driver = os.environ.get("ACTORS_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or driver is None:
        return None
    return browser, driver


@contextmanager
def chromium(browser: str, driver: str, *, width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A headless Chromium session that keeps the page's console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()
