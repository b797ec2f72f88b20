"""Smoke test of ``python -m benchmarks.http``: a tiny run, and its JSON.

Not a performance test: it makes sure the HTTP benchmark still runs end to
end (wrk against ``actors serve`` and against the ceiling server, the
paced client against ``actors serve``) and writes the figures the targets
are read from. No timing is asserted. It needs Debian's ``wrk`` (skips without
it, fails under CI, where .ci/run installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wrk() -> None:
    """Debian's wrk: a skip with a hint on a machine without it, a failure under CI."""
    if shutil.which("wrk") is None:
        if os.environ.get("CI"):
            pytest.fail("wrk is not installed (.ci/run installs it)")
        pytest.skip("needs wrk: apt-get install wrk")


@pytest.fixture(scope="module")
def run(wrk: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    out = tmp_path_factory.mktemp("httpbench") / "http.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.http",
            "--rounds",
            "1",
            "--seconds",
            "1",
            "--warmup",
            "0",
            "--connections",
            "4",
            "--sessions",
            "3",
            "--latency-seconds",
            "0.5",
            "--latency-warmup",
            "0.2",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_it_runs_and_prints_the_table(run: tuple[Any, dict[str, Any]]) -> None:
    proc, _ = run
    assert proc.returncode == 0, proc.stderr
    for word in ("ceiling", "ceiling_wait", "actors", "half load", "of the stack's ceiling"):
        assert word in proc.stdout


def test_every_scenario_answered_202_and_actors_handled_them(
    run: tuple[Any, dict[str, Any]],
) -> None:
    _, doc = run
    kinds = [r["scenario"] for r in doc["rounds"]]
    assert kinds == ["ceiling", "ceiling_wait", "actors"]
    for r in doc["rounds"]:
        assert r["requests"] > 0 and r["req_per_s"] > 0, r
        assert r["non_2xx"] == 0 and r["socket_errors"] == 0, r
        assert r["p99_ms"] >= r["p50_ms"] > 0, r
        assert r["server_cpu_us_per_req"] > 0, r
        assert r["exit_code"] == 0, r
    (actors,) = [r for r in doc["rounds"] if r["scenario"] == "actors"]
    # Every 202 was durable and then handled: the server's own count.
    assert actors["processed"] >= actors["answered_with_warmup"] > 0


def test_the_ratio_and_the_half_load_latency_are_there(run: tuple[Any, dict[str, Any]]) -> None:
    _, doc = run
    summary = doc["summary"]
    assert set(summary["ratios"]) == {"ceiling", "ceiling_wait"}
    assert summary["ratio"] == min(summary["ratios"].values()) > 0
    latency = doc["latency"]
    actors_rate = summary["actors"]["req_per_s"]["median"]
    assert latency["rate_offered"] == pytest.approx(actors_rate / 2)
    assert latency["requests_answered"] == latency["requests_offered"] > 0
    assert latency["statuses"] == {"202": latency["requests_answered"]}
    assert latency["p99_ms"] >= latency["p50_ms"] > 0
    assert len(doc["targets"]) == 2
    for target in doc["targets"]:
        assert target["verdict"].split()[0] in {"PASS", "FAIL", "UNSURE"}
