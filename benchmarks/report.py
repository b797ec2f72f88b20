"""Summaries (median, min, max over rounds), ratios, targets, and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.scenarios import DURABILITIES, LATENCY_BASE, PEERS, REPLAY_PREFIX, Scenario


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min, max and count of every numeric figure over the rounds that succeeded."""
    ok = [r for r in rounds if "error" not in r and "skipped" not in r]
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


def _median(summary: dict[str, Any], name: str, key: str = "msg_per_s") -> float | None:
    entry = summary.get(name, {}).get(key)
    return None if entry is None else float(entry["median"])


def limits(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The raw limit per durability: the better of 100 and 1,000 rows per transaction."""
    out = {}
    for d in DURABILITIES:
        found = [
            (v, f"raw_b{b}_{d}")
            for b in (100, 1000)
            if (v := _median(summary, f"raw_b{b}_{d}")) is not None
        ]
        if found:
            value, name = max(found)
            out[d] = {"msg_per_s": value, "scenario": name}
    return out


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    """actors / limit for every actors scenario; actors / each peer at the same durability."""
    out: dict[str, float] = {}
    lim = limits(summary)
    for name in summary:
        if not (name.startswith(("send_", "many_", "idle_"))):
            continue
        d = "full" if name.endswith("_full") else "normal"
        value = _median(summary, name)
        if value is not None and d in lim:
            out[f"{name} / limit_{d}"] = value / lim[d]["msg_per_s"]
        sql = _median(summary, REPLAY_PREFIX + name)
        if value is not None and sql:
            out[f"{name} / {REPLAY_PREFIX}{name}"] = value / sql
    batched, single = (
        _median(summary, "many_batch_s100_normal"),
        _median(summary, "many_s100_normal"),
    )
    if batched is not None and single:
        out["many_batch_s100_normal / many_s100_normal"] = batched / single
    for d in DURABILITIES:
        for actor in (f"send_s100_{d}", f"many_s100_{d}"):
            value = _median(summary, actor)
            for peer in PEERS:
                other = _median(summary, f"peer_{peer}_{d}")
                if value is not None and other:
                    out[f"{actor} / peer_{peer}_{d}"] = value / other
    return out


def ceilings(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each actors scenario against its two ceilings, on the medians.

    ``raw_limit``: the per-row baseline at its durability (raw.py, the better
    batch size). ``store_sql``: raw apsw replaying the statements the store
    ran for the same messages (store_sql.py; only the scenarios that have a
    ``raw_sql_`` twin). ``cpu_beyond_sql_us_per_msg`` is the CPU per message
    actors spends beyond that SQL: Python, not SQLite.
    """
    out: dict[str, dict[str, Any]] = {}
    lim = limits(summary)
    for name in summary:
        if not name.startswith(("send_", "many_", "idle_")):
            continue
        value = _median(summary, name)
        cpu = _median(summary, name, "cpu_us_per_msg")
        if value is None or cpu is None:
            continue
        d = "full" if name.endswith("_full") else "normal"
        entry: dict[str, Any] = {"msg_per_s": value, "cpu_us_per_msg": cpu}
        if d in lim:
            raw = lim[d]
            entry.update(
                raw_limit=raw["scenario"],
                raw_limit_msg_per_s=raw["msg_per_s"],
                of_raw_limit=value / raw["msg_per_s"],
                raw_limit_cpu_us_per_msg=_median(summary, raw["scenario"], "cpu_us_per_msg"),
            )
        twin = REPLAY_PREFIX + name
        sql = _median(summary, twin)
        sql_cpu = _median(summary, twin, "cpu_us_per_msg")
        if sql is not None and sql_cpu is not None:
            entry.update(
                store_sql=twin,
                store_sql_msg_per_s=sql,
                of_store_sql=value / sql,
                store_sql_cpu_us_per_msg=sql_cpu,
                cpu_over_store_sql=cpu / sql_cpu,
                cpu_beyond_sql_us_per_msg=cpu - sql_cpu,
            )
        out[name] = entry
    return out


def _ceiling_lines(summary: dict[str, Any]) -> list[str]:
    found = {n: e for n, e in ceilings(summary).items() if "store_sql" in e or "raw_limit" in e}
    if not found:
        return []
    lines = [
        "",
        "Against the ceilings (medians): raw per-row = raw.py, the better batch size;"
        " store SQL = raw apsw replaying the statements the store ran (store_sql.py)",
        f"  {'scenario':<20}{'msg/s':>10}{'of raw per-row':>16}{'of store SQL':>14}"
        f"{'CPU us/msg: actors':>20}{'raw per-row':>13}{'store SQL':>11}{'beyond SQL':>12}",
    ]
    for name, e in found.items():
        raw_cpu = e.get("raw_limit_cpu_us_per_msg")
        lines.append(
            f"  {name:<20}{e['msg_per_s']:>10,.0f}"
            f"{format(e['of_raw_limit'], '.2f') + 'x' if 'of_raw_limit' in e else '-':>16}"
            f"{format(e['of_store_sql'], '.2f') + 'x' if 'of_store_sql' in e else '-':>14}"
            f"{e['cpu_us_per_msg']:>20.1f}"
            f"{'-' if raw_cpu is None else format(raw_cpu, '.1f'):>13}"
            f"{format(e['store_sql_cpu_us_per_msg'], '.1f') if 'store_sql' in e else '-':>11}"
            f"{format(e['cpu_beyond_sql_us_per_msg'], '.1f') if 'store_sql' in e else '-':>12}"
        )
    return lines


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each checked on the medians: PASS, FAIL, or n/a (not measured)."""
    out: list[dict[str, Any]] = []

    def add(text: str, value: float | None, ok: bool | None, shown: str) -> None:
        status = "n/a" if value is None or ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": text, "value": value, "status": status, "shown": shown})

    e2e = _median(summary, LATENCY_BASE)
    add(
        ">= 60,000 msg/s end to end, normal, 100 sessions, one send() per message",
        e2e,
        None if e2e is None else e2e >= 60_000,
        "-" if e2e is None else f"{e2e:,.0f} msg/s",
    )
    lim = limits(summary).get("normal")
    share = None if e2e is None or lim is None else e2e / lim["msg_per_s"]
    add(
        ">= 50% of the raw limit (better of 100 and 1,000 rows/txn, normal)",
        share,
        None if share is None else share >= 0.5,
        "-" if share is None or lim is None else f"{share:.1%} of {lim['msg_per_s']:,.0f} msg/s",
    )
    many = _median(summary, "many_s100_normal")
    add(
        ">= 120,000 msg/s with send_many (1,000 per call), normal",
        many,
        None if many is None else many >= 120_000,
        "-" if many is None else f"{many:,.0f} msg/s",
    )
    for name, share, what in (
        ("send_s10k_normal", 0.5, "10,000 sessions x 10"),
        ("send_s100k_normal", 0.35, "100,000 sessions x 1"),
    ):
        short = _median(summary, name)
        base = _median(summary, "send_s100_normal")
        part = None if short is None or not base else short / base
        cpu = _median(summary, name, "cpu_us_per_msg")
        base_cpu = _median(summary, "send_s100_normal", "cpu_us_per_msg")
        add(
            f">= {share}x send_s100_normal's msg/s with {what}",
            part,
            None if part is None else part >= share,
            "-"
            if part is None or short is None
            else f"{part:.2f}x ({short:,.0f} msg/s, {cpu or 0:.1f} us CPU/msg"
            f" against {base_cpu or 0:.1f})",
        )
    batched = _median(summary, "many_batch_s100_normal")
    gain = None if batched is None or not many else batched / many
    batch_cpu = _median(summary, "many_batch_s100_normal", "cpu_us_per_msg")
    add(
        ">= 2x many_s100_normal's msg/s with a no-op batched handler (max_size=100)",
        gain,
        None if gain is None else gain >= 2,
        "-"
        if gain is None or batched is None
        else f"{gain:.2f}x ({batched:,.0f} msg/s, {batch_cpu or 0:.1f} us CPU/msg)",
    )
    peers = [(v, p) for p in PEERS if (v := _median(summary, f"peer_{p}_normal")) is not None]
    best = max(peers) if peers else None
    times = None if e2e is None or best is None else e2e / best[0]
    add(
        ">= 25x the best peer (normal)",
        times,
        None if times is None else times >= 25,
        "-" if times is None or best is None else f"{times:.1f}x {best[1]} ({best[0]:,.0f} msg/s)",
    )
    p99 = _median(summary, "latency_half", "send_p99_ms")
    frozen = _median(summary, "latency_gcfreeze", "send_p99_ms")
    add(
        "send() p99 < 5 ms at half load",
        p99,
        None if p99 is None else p99 < 5,
        ("-" if p99 is None else f"{p99:.2f} ms")
        + ("" if frozen is None else f" (with gc.freeze(): {frozen:.2f} ms)"),
    )
    idle0 = _median(summary, "idle_0")
    idle1 = _median(summary, "idle_100k")
    cpu0 = _median(summary, "idle_0", "cpu_us_per_msg")
    cpu1 = _median(summary, "idle_100k", "cpu_us_per_msg")
    if None in (idle0, idle1, cpu0, cpu1):
        add("cost flat in idle sessions (msg/s >= 85%, CPU/msg <= 115%)", None, None, "-")
    else:
        assert idle0 and idle1 and cpu0 and cpu1
        speed, cost = idle1 / idle0, cpu1 / cpu0
        add(
            "cost flat in idle sessions (msg/s >= 85%, CPU/msg <= 115%)",
            speed,
            speed >= 0.85 and cost <= 1.15,
            f"msg/s x{speed:.2f}, CPU/msg x{cost:.2f} with idle sessions",
        )
    return out


# -- printing -----------------------------------------------------------------


def _fmt(entry: dict[str, float] | None, digits: int = 0, unit: str = "") -> str:
    if entry is None:
        return "-"
    f = f"{{:,.{digits}f}}"
    text = f.format(entry["median"]) + unit
    if entry["n"] > 1:
        text += f" [{f.format(entry['min'])}-{f.format(entry['max'])}]"
    return text


def _latency_lines(
    s: Scenario, lat: dict[str, Any] | None, rounds: list[dict[str, Any]]
) -> list[str]:
    if not lat:
        return ["", f"{s.name}: {_problem(rounds) or 'no result'}"] if rounds else []
    lines = [
        "",
        f"Latency at a fixed offered rate of {lat['offered_rate']['median']:,.0f} msg/s "
        f"(half of {LATENCY_BASE}), achieved {lat['achieved_rate']['median']:,.0f} msg/s, "
        f"100 sessions: {s.name} ({s.label})",
    ]
    for what, key in (("send() call -> return", "send"), ("send() call -> handler", "start")):
        lines.append(
            f"  {what:<26} p50 {_fmt(lat[f'{key}_p50_ms'], 2, ' ms'):<28}"
            f"p99 {_fmt(lat[f'{key}_p99_ms'], 2, ' ms'):<28}"
            f"max {_fmt(lat[f'{key}_max_ms'], 2, ' ms')}"
        )
    lines.append(
        f"  {'pacing lag (due -> call)':<26} p99 {_fmt(lat['pacing_lag_p99_ms'], 2, ' ms')};"
        f"  CPU {_fmt(lat['cpu_us_per_msg'], 1, ' us/msg')}"
    )
    if "loop_busy" in lat:
        lines.append(
            f"  {'trio loop busy':<26} {lat['loop_busy']['median']:.0%}; the harness alone"
            f" (against a system that does nothing) {lat['harness_loop_busy']['median']:.0%}"
        )
    if "gc_full_collections" in lat:
        lines.append(
            f"  {'full GC collections':<26} {_fmt(lat['gc_full_collections'])} per run;"
            f" longest GC pause {_fmt(lat['gc_longest_pause_ms'], 1, ' ms')}"
        )
    return lines


def table(
    scenarios: list[Scenario],
    rounds: dict[str, list[dict[str, Any]]],
    summary: dict[str, Any],
    ratio: dict[str, float],
    checks: list[dict[str, Any]],
) -> str:
    lines: list[str] = []
    width = max(len(s.name) for s in scenarios) + 2
    label_w = max(len(s.label) for s in scenarios) + 2
    head = (
        f"{'scenario':<{width}}{'what':<{label_w}}{'msg/s median [min-max]':<30}"
        f"{'CPU us/msg median [min-max]':<30}{'loop / other':>14}{'msgs/commit':>13}"
        f"{'load':>7}"
    )
    lines += [
        "Throughput (each figure: median of the rounds, [min-max]; CPU: whole process, and"
        " split between the trio loop thread and the other threads (the sync thread of"
        " durability full, worker threads); load: the"
        " 1-minute load average when the runs ended, median)",
        head,
        "-" * len(head),
    ]
    for s in scenarios:
        if s.kind == "latency":
            continue
        sm = summary.get(s.name, {})
        note = _problem(rounds.get(s.name, []))
        if not sm:
            lines.append(f"{s.name:<{width}}{s.label:<{label_w}}{note or 'no result'}")
            continue
        per_commit = sm.get("msgs_per_commit")
        loop, store = sm.get("cpu_loop_us_per_msg"), sm.get("cpu_store_us_per_msg")
        split = (
            "-"
            if loop is None or store is None
            else f"{loop['median']:.0f} / {store['median']:.0f}"
        )
        lines.append(
            f"{s.name:<{width}}{s.label:<{label_w}}{_fmt(sm.get('msg_per_s')):<30}"
            f"{_fmt(sm.get('cpu_us_per_msg'), 1):<30}{split:>14}"
            f"{'-' if per_commit is None else format(per_commit['median'], ',.1f'):>13}"
            f"{'-' if 'loadavg' not in sm else format(sm['loadavg']['median'], '.1f'):>7}"
            + (f"  ({note})" if note else "")
        )
    for s in scenarios:
        if s.kind == "latency":
            lines += _latency_lines(s, summary.get(s.name), rounds.get(s.name, []))
    idle = summary.get("idle_100k", {})
    if "rss_idle_mb" in idle:
        lines += [
            "",
            f"Idle sessions: setup {_fmt(idle['idle_setup_s'], 1, ' s')}; RSS with the idle "
            f"sessions passivated {_fmt(idle['rss_idle_mb'], 0, ' MB')}, after the run "
            f"{_fmt(idle['rss_mb'], 0, ' MB')} (idle_0 after the run: "
            f"{_fmt(summary.get('idle_0', {}).get('rss_mb'), 0, ' MB')})",
        ]
    lim = limits(summary)
    if ratio:
        lines += ["", "Ratios (medians)"]
        for d, entry in lim.items():
            lines.append(f"  limit_{d} = {entry['scenario']}: {entry['msg_per_s']:,.0f} msg/s")
        for key, value in ratio.items():
            lines.append(f"  {key:<50} {value:10.2f}x")
    lines += _ceiling_lines(summary)
    lines += ["", "Targets (issue 'Performance'; checked on the medians, not asserted)"]
    for c in checks:
        lines.append(f"  {c['status']:<5} {c['target']:<78} {c['shown']}")
    return "\n".join(lines)


def _problem(rounds: list[dict[str, Any]]) -> str:
    errors = [r["error"] for r in rounds if "error" in r]
    skipped = [r["skipped"] for r in rounds if "skipped" in r]
    if errors:
        return f"ERROR in {len(errors)}/{len(rounds)} round(s): {errors[0]}"
    if skipped:
        return f"skipped: {skipped[0]}"
    return ""
