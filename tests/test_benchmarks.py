"""Smoke test of the benchmark harness: a tiny run, and the shape of its JSON.

Not a performance test: it only makes sure ``python -m benchmarks`` still
runs end to end and writes figures that are there and positive, and that the
latency harness's senders send each message once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = [
    "raw_b100_normal",
    "send_s100_normal",
    "send_s10k_normal",
    "send_s100k_normal",
    "many_s100_normal",
    "many_batch_s100_normal",
    "raw_sql_send_s100_normal",
    "latency_half",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--scale",
            "0.003",
            "--only",
            ",".join(SCENARIOS),
            "--out",
            str(out),
            "--tmpdir",
            str(out),
            "--timeout",
            "60",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    latest = out / "latest.json"
    assert latest.exists(), proc.stdout + proc.stderr
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1
    return proc, json.loads(latest.read_text())


def test_harness_runs_and_prints_the_table(
    run: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    proc, _ = run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("Throughput", "Latency at a fixed offered rate", "Ratios", "Targets"):
        assert text in proc.stdout
    for name in SCENARIOS[:-1]:  # the throughput rows; latency has its own lines
        assert name in proc.stdout


def test_json_has_positive_figures(run: tuple[subprocess.CompletedProcess[str], dict]) -> None:
    _, doc = run
    assert {"meta", "scenarios", "summary", "limits", "ratios", "targets"} <= doc.keys()
    assert doc["meta"]["rounds"] == 1
    assert set(doc["scenarios"]) == set(SCENARIOS)
    for name in (
        "raw_b100_normal",
        "send_s100_normal",
        "many_s100_normal",
        "many_batch_s100_normal",
        "raw_sql_send_s100_normal",
    ):
        (result,) = doc["scenarios"][name]["rounds"]
        assert "error" not in result, result
        for key in ("messages", "elapsed_s", "msg_per_s", "cpu_us_per_msg", "msgs_per_commit"):
            assert result[key] > 0, (name, key, result)
        summary = doc["scenarios"][name]["summary"]
        assert summary["msg_per_s"]["median"] == result["msg_per_s"]
    (latency,) = doc["scenarios"]["latency_half"]["rounds"]
    assert "error" not in latency, latency
    for key in ("offered_rate", "send_p50_ms", "send_p99_ms", "start_p50_ms", "start_p99_ms"):
        assert latency[key] > 0, (key, latency)
    assert latency["send_p50_ms"] <= latency["send_p99_ms"]
    # Shares of wall time: the harness alone must use less of the loop than with the system.
    assert 0 < latency["harness_loop_busy"] < latency["loop_busy"] <= 1, latency
    assert doc["limits"]["normal"]["msg_per_s"] > 0
    assert doc["ratios"]["send_s100_normal / limit_normal"] > 0
    assert doc["ratios"]["send_s100_normal / raw_sql_send_s100_normal"] > 0
    assert doc["ratios"]["many_batch_s100_normal / many_s100_normal"] > 0


def test_the_store_sql_ceiling_replays_the_whole_run(
    run: tuple[subprocess.CompletedProcess[str], dict],
) -> None:
    """The replay ran the store's transactions for every message: the same
    messages and commits as its recorded run, fewer SQLite calls than
    messages (batched inserts, ack boxes), every row deleted at the end; and
    the report sets send() against both ceilings, in CPU too."""
    proc, doc = run
    (replay,) = doc["scenarios"]["raw_sql_send_s100_normal"]["rounds"]
    (send,) = doc["scenarios"]["send_s100_normal"]["rounds"]
    assert replay["messages"] == send["messages"]
    assert replay["rows_left"] == 0
    assert replay["msgs_per_commit"] == replay["capture_msgs_per_commit"]
    assert 0 < replay["sqlite_calls_per_msg"] <= replay["statements_per_msg"]
    assert replay["sqlite_calls_per_msg"] < 1
    entry = doc["ceilings"]["send_s100_normal"]
    assert entry["store_sql"] == "raw_sql_send_s100_normal"
    assert entry["of_store_sql"] == pytest.approx(send["msg_per_s"] / replay["msg_per_s"])
    assert entry["of_raw_limit"] > 0
    assert entry["cpu_beyond_sql_us_per_msg"] == pytest.approx(
        send["cpu_us_per_msg"] - replay["cpu_us_per_msg"]
    )
    assert "Against the ceilings" in proc.stdout
    statuses = {t["target"]: t["status"] for t in doc["targets"]}
    assert len(statuses) == 9
    assert set(statuses.values()) <= {"PASS", "FAIL", "n/a"}
    # Measured here: end to end, share of the limit, the two of short
    # sessions, send_many, batched, latency.
    assert sum(s != "n/a" for s in statuses.values()) == 7
    (short,) = (t for t in doc["targets"] if "100,000 sessions x 1" in t["target"])
    (s100k,) = doc["scenarios"]["send_s100k_normal"]["rounds"]
    assert short["value"] == pytest.approx(s100k["msg_per_s"] / send["msg_per_s"])
    batched = next(t for t in doc["targets"] if "batched handler" in t["target"])
    assert batched["value"] == pytest.approx(
        doc["ratios"]["many_batch_s100_normal / many_s100_normal"]
    )


async def test_the_latency_harness_sends_each_message_once_and_its_senders_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The instrument itself: with far fewer senders than messages due at once
    (the backlog path), every message is sent exactly once, its call and
    return are stamped in order, and run() returns with every sender gone."""
    import trio

    from benchmarks import e2e

    monkeypatch.setattr(e2e, "WORKERS", 8)
    sent: list[int] = []

    async def send(session_id: str, body: dict[str, int]) -> None:
        sent.append(body["n"])
        for _ in range(3):  # a send that takes a few scheduling rounds
            await trio.lowlevel.checkpoint()

    n = 2000
    senders = e2e._Senders(send, ["a", "b", "c"])
    with trio.fail_after(30):
        due = await senders.run(1_000_000.0, n)  # all due within 2 ms: most wait in the backlog
    assert sorted(sent) == list(range(n))
    assert all(0 < d <= c <= r for d, c, r in zip(due, senders.call, senders.ret, strict=True))
    # run() returned, so its nursery of senders closed: each took its None and left.
    assert not senders._idle and not senders._backlog
