"""Run the benchmarks: ``python -m benchmarks [--rounds N] [--quick] [--only NAME,...]``.

Rounds are interleaved (round 1 runs every scenario once, then round 2, ...),
so a noisy neighbour spreads over all scenarios instead of spoiling one;
every figure is the median of the rounds, shown with its min and max. Each
scenario runs in a fresh subprocess on a fresh database in its own temporary
directory. The table goes to stdout; the JSON to
``benchmarks/results/<timestamp>.json`` and ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks._worker import MARKER
from benchmarks.scenarios import LATENCY_BASE, Scenario, build, select

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of actors against raw SQLite and peer libraries.",
    )
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument(
        "--quick", action="store_true", help="1 round, sizes x0.05, 1 s of latency sampling"
    )
    p.add_argument("--scale", type=float, default=None, help="multiply the sizes (floors apply)")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run the scenarios matching NAME (a name, prefix or glob; comma-separated, "
        "repeatable), e.g. --only raw,send_s100",
    )
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="print the table of an earlier run's JSON (e.g. benchmarks/results/latest.json)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON goes")
    p.add_argument(
        "--tmpdir",
        default=None,
        help="where the databases go (default: the system temp dir; it must be a real disk "
        "for durability=full to mean anything, not tmpfs)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per scenario run")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.scale is None:
        args.scale = 0.05 if args.quick else 1.0
    if args.only:
        args.only = [part for item in args.only for part in item.split(",") if part]
    return args


def snapshot_code(into: Path) -> str:
    """Copy ``actors`` and ``benchmarks`` into ``into``; return a hash of actors' source.

    The workers run from this copy, so every round measures the same code even
    while someone edits the working tree during a long run.
    """
    skip = shutil.ignore_patterns("__pycache__", "results", "*.pyc")
    shutil.copytree(ROOT / "actors", into / "actors", ignore=skip)
    shutil.copytree(HERE, into / "benchmarks", ignore=skip)
    return source_digest(into)


def source_digest(into: Path) -> str:
    """A hash of the source of ``into/actors``: which code a run measured."""
    digest = hashlib.sha256()
    for path in sorted((into / "actors").rglob("*.py")):
        digest.update(path.relative_to(into).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_one(
    scenario: Scenario, params: dict[str, Any], code: Path, tmpdir: str | None, timeout: float
) -> Any:
    """Run one scenario in a fresh interpreter on a fresh directory; return its figures."""
    with tempfile.TemporaryDirectory(prefix=f"actors-bench-{scenario.name}-", dir=tmpdir) as d:
        spec = json.dumps({"kind": scenario.kind, "params": params, "dir": d})
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks._worker", spec],
                cwd=code,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
            if "error" in result:
                sys.stderr.write(proc.stderr)
            return result
    sys.stderr.write(proc.stdout + proc.stderr)
    return {"error": f"the worker exited with status {proc.returncode} and no result"}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def meta(args: argparse.Namespace) -> dict[str, Any]:
    import apsw

    dirty = _git("status", "--porcelain", "--", "actors")
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "rounds": args.rounds,
        "scale": args.scale,
        "quick": args.quick,
        "git_commit": _git("rev-parse", "HEAD"),
        "actors_dirty": None if dirty is None else bool(dirty),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "sqlite_apsw": apsw.sqlite_lib_version(),
        "sqlite_stdlib": sqlite3.sqlite_version,
        "tmpdir": args.tmpdir or tempfile.gettempdir(),
        "versions": {
            d: _version(d) for d in ("actors", "trio", "apsw", "persist-queue", "litequeue", "huey")
        },
    }


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"ERROR {result['error']}"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "send_p99_ms" in result:
        return (
            f"send p50 {result['send_p50_ms']:.2f} p99 {result['send_p99_ms']:.2f} ms, "
            f"handler start p99 {result['start_p99_ms']:.2f} ms at "
            f"{result['offered_rate']:,.0f} msg/s, loop busy {result['loop_busy']:.0%}, "
            f"{result['gc_full_collections']} full GC ({result['gc_longest_pause_ms']:.0f} ms)"
        )
    return f"{result['msg_per_s']:>10,.0f} msg/s {result['cpu_us_per_msg']:7.1f} us/msg"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report is not None:
        return show(args.report)
    scenarios = select(build(args.scale, args.quick), args.only)
    if args.list:
        for s in scenarios:
            print(f"{s.name:<26}{s.label}")
        return 0
    if not scenarios:
        _progress(f"no scenario matches {args.only}; see --list")
        return 2
    info = meta(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="actors-bench-code-") as code:
        info["actors_source_sha256"] = snapshot_code(Path(code))
        return _run(args, scenarios, info, Path(code))


def _run(
    args: argparse.Namespace, scenarios: list[Scenario], info: dict[str, Any], code: Path
) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in scenarios}
    begin = time.perf_counter()
    document: dict[str, Any] = {}
    for r in range(1, args.rounds + 1):
        for s in scenarios:
            params = dict(s.params)
            if s.kind == "latency":
                base = [x["msg_per_s"] for x in rounds.get(LATENCY_BASE, []) if "msg_per_s" in x]
                if not base:
                    rounds[s.name].append({"error": f"no {LATENCY_BASE} figure to set the rate"})
                    continue
                params["rate"] = statistics.median(base) / 2
            t0 = time.perf_counter()
            result = run_one(s, params, code, args.tmpdir, args.timeout)
            result.setdefault("wall_s", time.perf_counter() - t0)
            result["loadavg"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            rounds[s.name].append(result)
            _progress(f"[round {r}/{args.rounds}] {s.name:<26} {_brief(result)}")
        document = _document(info, scenarios, rounds, begin)
        _write(args.out, stamp, document)  # after every round: a cut-short run keeps its data
    print(
        report.table(
            scenarios, rounds, document["summary"], document["ratios"], document["targets"]
        )
    )
    print(f"\nJSON: {args.out / (stamp + '.json')} (and latest.json)")
    failed = [n for n, rs in rounds.items() if any("error" in x for x in rs)]
    if failed:
        _progress(f"errors in: {', '.join(failed)}")
        return 1
    return 0


def show(path: Path) -> int:
    """Print the table of a JSON written by an earlier run (figures recomputed from its rounds)."""
    doc = json.loads(path.read_text())
    scenarios = [
        Scenario(name, entry["kind"], entry["label"], entry["params"])
        for name, entry in doc["scenarios"].items()
    ]
    rounds = {name: entry["rounds"] for name, entry in doc["scenarios"].items()}
    summary = {name: sm for name, rs in rounds.items() if (sm := report.summarize(rs))}
    m = doc["meta"]
    local = " + local changes" if m.get("actors_dirty") else ""
    print(
        f"{path}: started {m['started']}, {m['rounds']} round(s), scale {m['scale']}, "
        f"actors {str(m.get('git_commit'))[:10]}{local}"
        f", {m['cpus']} CPUs, load {m.get('loadavg_start')} -> {m.get('loadavg_end')}\n"
    )
    print(report.table(scenarios, rounds, summary, report.ratios(summary), report.targets(summary)))
    return 0


def _document(
    info: dict[str, Any],
    scenarios: list[Scenario],
    rounds: dict[str, list[dict[str, Any]]],
    begin: float,
) -> dict[str, Any]:
    summary = {name: report.summarize(rs) for name, rs in rounds.items()}
    summary = {name: sm for name, sm in summary.items() if sm}
    info = dict(info, duration_s=time.perf_counter() - begin)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    return {
        "meta": info,
        "scenarios": {
            s.name: {
                "kind": s.kind,
                "label": s.label,
                "params": s.params,
                "rounds": rounds[s.name],
                "summary": summary.get(s.name, {}),
            }
            for s in scenarios
        },
        "summary": summary,
        "limits": report.limits(summary),
        "ratios": report.ratios(summary),
        "ceilings": report.ceilings(summary),
        "targets": report.targets(summary),
    }


def _write(out: Path, stamp: str, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=2)
    (out / f"{stamp}.json").write_text(text)
    tmp = out / "latest.json.tmp"
    tmp.write_text(text)
    tmp.replace(out / "latest.json")
