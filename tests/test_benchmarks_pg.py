"""Smoke test of ``python -m benchmarks.pg``: a tiny run on the tests' server, and its JSON.

Not a performance test: it only makes sure the PostgreSQL benchmark still runs
end to end (worker processes, the barrier, drain, the server's readings, the
latency harness) and writes figures that are there and positive. The peers
(procrastinate, pgqueuer) are the bench extra's, not the test extra's: left
out here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(pg_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any]]:
    out = tmp_path_factory.mktemp("pgbench") / "pg.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.pg",
            "--rounds",
            "1",
            "--messages",
            "300",
            "--workers",
            "1,2",
            "--peers",
            "",
            "--latency-seconds",
            "0.5",
            "--latency-fixed",
            "200",
            "--out",
            str(out),
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        env={**os.environ, "ACTORS_BENCH_POSTGRES": pg_server},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_it_runs_and_prints_the_table(run: tuple[Any, dict[str, Any]]) -> None:
    proc, _ = run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("actors_w1", "actors_w2", "actors_send_w2", "latency_w2", "latency_200_w2"):
        assert f"| {name} |" in proc.stdout
    assert ">= 10,000 msg/s end to end" in proc.stdout


def test_every_message_is_counted_once(run: tuple[Any, dict[str, Any]]) -> None:
    _, doc = run
    for name in ("actors_w1", "actors_w2", "actors_send_w2"):
        (result,) = doc["scenarios"][name]["rounds"]
        assert "error" not in result, result
        assert result["messages"] == result["handled"] == 300
        for key in ("elapsed_s", "msg_per_s", "worker_cpu_us_per_msg", "write_xacts_per_msg"):
            assert result[key] > 0, (name, key, result)
        assert result["store"]["commits"] > 0
        assert result["store_groups"] > 0
    (w2,) = doc["scenarios"]["actors_w2"]["rounds"]
    assert w2["buckets_per_member"] == [512, 512]
    assert sum(w2["sessions_per_member"]) == 100


def test_latency_figures(run: tuple[Any, dict[str, Any]]) -> None:
    _, doc = run
    (base,) = doc["scenarios"]["actors_w2"]["rounds"]
    (latency,) = doc["scenarios"]["latency_w2"]["rounds"]
    assert "error" not in latency, latency
    assert latency["offered_rate"] == pytest.approx(base["msg_per_s"] / 2)
    assert 0 < latency["send_p50_ms"] <= latency["send_p99_ms"] <= latency["send_max_ms"]
    assert 0 < latency["start_p50_ms"] <= latency["start_p99_ms"]
    assert latency["handled"] == latency["messages"]
    (fixed,) = doc["scenarios"]["latency_200_w2"]["rounds"]
    assert fixed["offered_rate"] == pytest.approx(200)
    (single,) = doc["scenarios"]["actors_send_w2"]["rounds"]
    (half,) = doc["scenarios"]["latency_send_w2"]["rounds"]
    assert "error" not in half, half
    assert half["offered_rate"] == pytest.approx(single["msg_per_s"] / 2)


def test_the_failover_benchmark_runs(pg_url: str, tmp_path: Path) -> None:
    """benchmarks/pg_failover.py, one kill and one clean stop (its figures are
    a benchmark's: here only that it runs and reports them)."""
    out = tmp_path / "failover.json"
    command = ["benchmarks.pg_failover", "--kills", "1", "--stops", "1", "--url", pg_url]
    proc = subprocess.run(
        [sys.executable, "-m", *command, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["kill"]["first_start"]["n"] == 1
    assert doc["stop"]["first_start"]["n"] == 1
    assert doc["kill"]["first_start"]["p99"] > 0
