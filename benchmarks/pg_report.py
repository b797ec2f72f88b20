"""The figures of one run of benchmarks/pg.py, their medians, the targets and the table."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any

from benchmarks.e2e import _percentile
from benchmarks.pg_worker import DRAIN_TAG

# The top statements kept per run (by server time), their text cut to this.
TOP_STATEMENTS = 12
QUERY_CHARS = 160


def figures(
    s: Any,
    results: list[dict[str, Any]],
    before: dict[str, Any],
    after: dict[str, Any],
    stmts: list[dict[str, Any]] | None,
    life0: dict[str, Any],
    life1: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """A run's figures from its workers' results and the server's readings."""
    sent = sum(r["sent"] for r in results)
    handled = sum(r["handled"] for r in results)
    t0 = min(r["t0"] for r in results)
    elapsed = max(r["t1"] for r in results) - t0
    worker_cpu = sum(r["cpu_s"] for r in results)
    out: dict[str, Any] = {
        "messages": sent,
        "handled": handled,
        "elapsed_s": elapsed,
        "send_phase_s": max(r["t_sent"] for r in results) - t0,
        "msg_per_s": sent / elapsed,
        "worker_cpu_us_per_msg": worker_cpu / sent * 1e6,
    }
    if before["cpu"] is not None and after["cpu"] is not None:
        out["server_cpu_us_per_msg"] = (after["cpu"] - before["cpu"]) / sent * 1e6
        out["total_cpu_us_per_msg"] = out["worker_cpu_us_per_msg"] + out["server_cpu_us_per_msg"]
    out.update(
        write_xacts_per_msg=(after["xid"] - before["xid"]) / sent,
        wal_bytes_per_msg=(after["wal"] - before["wal"]) / sent,
    )
    if stmts is not None:
        out.update(_statements(stmts, sent))
    # Over the workers' lives, start and stop included (the statistics lag: see pg_server).
    life = {k: life1[k] - life0[k] for k in life1}
    out["lifetime"] = life
    out["lifetime_xacts_per_msg"] = (life["xact_commit"] + life["xact_rollback"]) / sent
    out["lifetime_wal_syncs"] = life["wal_sync"]
    threads: dict[str, float] = {}
    for r in results:
        for name, sec in r["threads_cpu_s"].items():
            threads[_thread_group(name)] = threads.get(_thread_group(name), 0.0) + sec
    out["threads_cpu_us_per_msg"] = {k: round(v / sent * 1e6, 2) for k, v in threads.items()}
    out.update(extra)
    if "store" in results[0]:
        store = {k: sum(r["store"][k] for r in results) for k in results[0]["store"]}
        out["store"] = store
        out["store_commits_per_msg"] = store["commits"] / sent
        out["msgs_per_store_commit"] = sent / store["commits"] if store["commits"] else None
        out["fenced_writes"] = store["fenced_writes"]
    if "send_ms" in results[0]:
        out.update(_latency(results))
    if "store_groups" in results[0]:
        out.update(_groups(results, elapsed, sent))
    if "profiles" in results[0]:
        out["profiles"] = [r["profiles"] for r in results]
    out["per_worker"] = [
        {k: v for k, v in r.items() if k not in ("send_ms", "start_ms", "store_group_ms")}
        for r in results
    ]
    if handled < sent:
        out["error"] = f"{handled} messages handled of {sent}"
    return out


def _statements(stmts: list[dict[str, Any]], sent: int) -> dict[str, Any]:
    """Round trips per message from pg_stat_statements; the harness's own drain
    checks (DRAIN_TAG) counted apart."""
    harness = [x for x in stmts if DRAIN_TAG.strip() in x["query"]]
    mine = [x for x in stmts if DRAIN_TAG.strip() not in x["query"]]
    calls = sum(x["calls"] for x in mine)
    commits = sum(x["calls"] for x in mine if x["query"].strip().upper() == "COMMIT")
    return {
        "statements_per_msg": calls / sent,
        "commits_per_msg": commits / sent,
        "server_exec_us_per_msg": sum(x["exec_ms"] for x in mine) * 1e3 / sent,
        "harness_statements": sum(x["calls"] for x in harness),
        "top_statements": [
            {**x, "query": " ".join(x["query"].split())[:QUERY_CHARS]}
            for x in mine[:TOP_STATEMENTS]
        ],
    }


def _groups(results: list[dict[str, Any]], elapsed: float, sent: int) -> dict[str, Any]:
    """The store's group transactions (timed in the workers): how long, how busy, waiting."""
    groups = sum(r["store_groups"] for r in results)
    wall = sum(r["store_group_wall_s"] for r in results)
    cpu = sum(r["store_group_cpu_s"] for r in results)
    ms = sorted(x for r in results for x in r["store_group_ms"])
    if not groups:
        return {}
    return {
        "store_groups": groups,
        "store_group_ops_mean": sum(r["store_group_ops"] for r in results) / groups,
        "store_group_ms_mean": wall / groups * 1e3,
        "store_group_ms_p50": _percentile(ms, 50),
        "store_group_ms_p99": _percentile(ms, 99),
        # Share of the span each process's committer was inside a transaction.
        "store_busy_share": wall / len(results) / elapsed,
        # Of a transaction's wall time, the share the thread ran Python (the
        # rest: waiting for the server's answers and fsync, and for the GIL).
        "store_cpu_share": cpu / wall if wall else None,
        "store_thread_cpu_us_per_msg": cpu / sent * 1e6,
    }


def _thread_group(name: str) -> str:
    """Trio's worker threads are named after the job they run: group them."""
    if name in ("main", "python"):
        # (python: threads Python left unnamed, actors' listener and the stdin reader)
        return "main" if name == "main" else "other-threads"
    # Trio names its worker threads after the job they run (for actors: the
    # store's group transactions); the peers start no other thread.
    return "trio-threads"


def _latency(results: list[dict[str, Any]]) -> dict[str, Any]:
    send = sorted(x for r in results for x in r["send_ms"])
    start = sorted(x for r in results for x in r["start_ms"])
    return {
        "offered_rate": sum(r["offered_rate"] for r in results),
        "achieved_rate": sum(r["achieved_rate"] for r in results),
        "send_p50_ms": _percentile(send, 50),
        "send_p99_ms": _percentile(send, 99),
        "send_max_ms": send[-1],
        "start_p50_ms": _percentile(start, 50),
        "start_p99_ms": _percentile(start, 99),
        "start_max_ms": start[-1],
        "pacing_lag_p99_ms": max(r["pacing_lag_p99_ms"] for r in results),
    }


def brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    server = r.get("server_cpu_us_per_msg")
    text = (
        f"{r['msg_per_s']:>9,.0f} msg/s  cpu {r['worker_cpu_us_per_msg']:6.1f} + "
        f"{server if server is None else round(server, 1)} us/msg  "
        f"{r.get('statements_per_msg', math.nan):.2f} stmts/msg  ({r['elapsed_s']:.1f} s)"
    )
    if "send_p99_ms" in r:
        text += (
            f"  send p50 {r['send_p50_ms']:.2f} p99 {r['send_p99_ms']:.2f} ms,"
            f" start p99 {r['start_p99_ms']:.2f} ms at {r['offered_rate']:,.0f}/s"
        )
    return text


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min, max and count of every top-level number over the rounds that succeeded."""
    ok = [r for r in rounds if "error" not in r]
    keys = sorted({k for r in ok for k, v in r.items() if isinstance(v, int | float)})
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        out[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "n": len(values),
        }
    return out


def _med(summary: dict[str, Any], name: str, key: str = "msg_per_s") -> float | None:
    entry = summary.get(name, {}).get(key)
    return None if entry is None else float(entry["median"])


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    out = {}
    for w in (1, 2):
        mine = _med(summary, f"actors_w{w}")
        for peer in ("procrastinate", "pgqueuer"):
            other = _med(summary, f"{peer}_w{w}")
            if mine and other:
                out[f"actors_w{w} / {peer}_w{w}"] = mine / other
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the medians: PASS, FAIL, or n/a (not measured)."""
    out: list[dict[str, Any]] = []

    def add(text: str, value: float | None, ok: bool | None, shown: str) -> None:
        status = "n/a" if value is None or ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": text, "value": value, "status": status, "shown": shown})

    e2e = _med(summary, "actors_w2")
    add(
        ">= 10,000 msg/s end to end, 2 worker processes, PostgreSQL on the same 2 cores",
        e2e,
        None if e2e is None else e2e >= 10_000,
        "n/a" if e2e is None else f"{e2e:,.0f} msg/s",
    )
    r = ratios(summary)
    for peer, factor in (("procrastinate", 5), ("pgqueuer", 2)):
        v = r.get(f"actors_w2 / {peer}_w2")
        add(
            f">= {factor}x {peer} (2 processes each, same run)",
            v,
            None if v is None else v >= factor,
            "n/a" if v is None else f"{v:.2f}x",
        )
    for name, load in (
        ("latency_send_w2", "half the load one send() per message sustains"),
        ("latency_w2", "half the end-to-end load of send_many"),
    ):
        p99 = _med(summary, name, "send_p99_ms")
        rate = _med(summary, name, "offered_rate")
        add(
            f"send() p99 < 20 ms at {load}",
            p99,
            None if p99 is None else p99 < 20,
            "n/a" if p99 is None or rate is None else f"{p99:.2f} ms at {rate:,.0f} msg/s",
        )
    return out


def projection(summary: dict[str, Any], cpus: int) -> dict[str, Any]:
    """What the measured costs per message say about bigger machines (actors_w2's medians).

    CPU-bound ceilings: ``1e6 / cost`` messages per second per core; which
    side needs how many cores for a given rate. The measured msg/s against
    the 2-core ceiling says how far the run was from CPU-bound.
    """
    worker = _med(summary, "actors_w2", "worker_cpu_us_per_msg")
    server = _med(summary, "actors_w2", "server_cpu_us_per_msg")
    rate = _med(summary, "actors_w2")
    if worker is None or server is None or rate is None:
        return {}
    return {
        "worker_cpu_us_per_msg": worker,
        "server_cpu_us_per_msg": server,
        "ceiling_this_machine_msg_per_s": cpus * 1e6 / (worker + server),
        "measured_msg_per_s": rate,
        "cpu_busy_share": rate * (worker + server) / (cpus * 1e6),
        "worker_cores_per_10k_msg_per_s": worker * 1e4 / 1e6,
        "server_cores_per_10k_msg_per_s": server * 1e4 / 1e6,
        "msg_per_s_per_server_core": 1e6 / server,
        "msg_per_s_per_worker_core": 1e6 / worker,
    }


def document(
    info: dict[str, Any],
    names: list[tuple[str, Any]],
    rounds: dict[str, list[dict[str, Any]]],
    begin: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    summary = {k: sm for k, rs in rounds.items() if (sm := summarize(rs))}
    info = dict(
        info, duration_s=round(time.monotonic() - begin, 1), loadavg_end=list(os.getloadavg())
    )
    scenarios = {}
    for profile, s in names:
        key = s.name if args.server != "both" else f"{s.name}@{profile}"
        scenarios[key] = {
            "kind": s.kind,
            "label": s.label,
            "workers": s.workers,
            "server": profile,
            "params": s.params,
            "rounds": rounds[key],
            "summary": summary.get(key, {}),
        }
    return {
        "meta": info,
        "scenarios": scenarios,
        "ratios": ratios(summary),
        "targets": targets(summary),
        "projection": projection(summary, int(info.get("cpus") or 2)),
    }


def _spread(entry: dict[str, Any] | None, fmt: str) -> str:
    if not entry:
        return "-"
    mid, low, high = (fmt.format(entry[k]) for k in ("median", "min", "max"))
    return f"{mid} [{low}-{high}]"


def _one(entry: dict[str, Any] | None, fmt: str) -> str:
    return "-" if not entry else fmt.format(entry["median"])


def table(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    durability = ("fsync", "synchronous_commit", "full_page_writes")
    shown = ", ".join(f"{k}={v}" for k, v in m.get("settings", {}).items() if k in durability)
    head = (
        f"PostgreSQL {m['server']['version']} ({shown}), "
        f"{m['messages']:,} messages to {m['sessions']} keys per run, {m['rounds']} rounds, "
        f"{m['cpus']} CPUs, load {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; "
        "medians [min-max]; CPU in µs per message"
    )
    rows = [
        head,
        "",
        "| scenario | messages | msg/s | workers CPU | server CPU | total CPU | stmts/msg "
        "| COMMITs/msg | write xacts/msg | WAL B/msg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lat, store = [], []
    for name, entry in doc["scenarios"].items():
        sm = entry["summary"]
        if not sm:
            rows.append(f"| {name} | failed | | | | | | | | |")
            continue
        rows.append(
            f"| {name} | {_one(sm.get('messages'), '{:,.0f}')} "
            f"| {_spread(sm.get('msg_per_s'), '{:,.0f}')} "
            f"| {_spread(sm.get('worker_cpu_us_per_msg'), '{:.0f}')} "
            f"| {_spread(sm.get('server_cpu_us_per_msg'), '{:.0f}')} "
            f"| {_one(sm.get('total_cpu_us_per_msg'), '{:.0f}')} "
            f"| {_one(sm.get('statements_per_msg'), '{:.2f}')} "
            f"| {_one(sm.get('commits_per_msg'), '{:.3f}')} "
            f"| {_one(sm.get('write_xacts_per_msg'), '{:.3f}')} "
            f"| {_one(sm.get('wal_bytes_per_msg'), '{:,.0f}')} |"
        )
        if "store_group_ms_mean" in sm:
            store.append(
                f"| {name} | {_one(sm.get('msgs_per_store_commit'), '{:,.0f}')} "
                f"| {_one(sm.get('store_group_ops_mean'), '{:.1f}')} "
                f"| {_one(sm.get('store_group_ms_mean'), '{:.1f}')} "
                f"| {_one(sm.get('store_group_ms_p99'), '{:.1f}')} "
                f"| {_one(sm.get('store_busy_share'), '{:.0%}')} "
                f"| {_one(sm.get('store_cpu_share'), '{:.0%}')} "
                f"| {_one(sm.get('store_thread_cpu_us_per_msg'), '{:.0f}')} |"
            )
        if "send_p99_ms" in sm:
            lat.append(
                f"| {name} | {_one(sm.get('offered_rate'), '{:,.0f}')} "
                f"| {_spread(sm.get('send_p50_ms'), '{:.2f}')} "
                f"| {_spread(sm.get('send_p99_ms'), '{:.2f}')} "
                f"| {_spread(sm.get('start_p50_ms'), '{:.2f}')} "
                f"| {_spread(sm.get('start_p99_ms'), '{:.2f}')} |"
            )
    if lat:
        rows += [
            "",
            "| latency | offered msg/s | send p50 ms | send p99 ms | send->handler p50 ms "
            "| send->handler p99 ms |",
            "|---|---|---|---|---|---|",
            *lat,
        ]
    if store:
        rows += [
            "",
            "| actors' store | msgs/commit | ops/txn | txn ms mean | txn ms p99 "
            "| committer busy | Python share of txn | store thread CPU µs/msg |",
            "|---|---|---|---|---|---|---|---|",
            *store,
        ]
    rows.append("")
    for k, v in doc.get("ratios", {}).items():
        rows.append(f"{k}: {v:.2f}x")
    for t in doc.get("targets", []):
        rows.append(f"[{t['status']}] {t['target']}: {t['shown']}")
    p = doc.get("projection")
    if p:
        rows.append(
            f"actors_w2 costs {p['worker_cpu_us_per_msg']:.0f} µs (workers) + "
            f"{p['server_cpu_us_per_msg']:.0f} µs (server) CPU per message: CPU-bound ceiling "
            f"on {m['cpus']} cores {p['ceiling_this_machine_msg_per_s']:,.0f} msg/s (measured "
            f"{p['measured_msg_per_s']:,.0f}, {p['cpu_busy_share']:.0%} of the CPU); per core: "
            f"{p['msg_per_s_per_worker_core']:,.0f} msg/s of workers, "
            f"{p['msg_per_s_per_server_core']:,.0f} msg/s of server"
        )
    return "\n".join(rows)
