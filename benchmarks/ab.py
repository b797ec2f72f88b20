"""A/B runs: ``python -m benchmarks.ab BASE [--b REV] --only NAME,... [--pairs N]``.

A is ``actors`` and ``benchmarks`` as of the git revision BASE; B is the
working tree (or the revision ``--b``). Each side is copied once into its own
directory, and every run starts a fresh worker process in that copy on a
fresh database, as ``python -m benchmarks`` does: each side measures itself
with its own harness, on the parameters of B's scenarios.

The runs interleave strictly, one at a time: for each pair, every scenario
runs once on A and once on B, in the order A B on even pairs and B A on odd
ones, so that a drift in the machine's speed does not always fall on the
same side. The load average is recorded after each run. The criterion is
CPU µs per message (``time.process_time`` over the messages), which a busy
neighbour blurs less than msg/s; the table shows the medians of both sides,
the ratio B/A of the medians, and the spread of the per-pair ratios.

The JSON of the runs goes to ``--out`` (``benchmarks/results/ab-<timestamp>.json``
by default), rewritten after every pair; ``--report JSON`` prints its table
again.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.run import ROOT, meta, run_one, snapshot_code, source_digest
from benchmarks.scenarios import Scenario, build, select

HERE = Path(__file__).resolve().parent
KEY = "cpu_us_per_msg"
THRESHOLD = 1.05  # B/A of the median CPU µs per message above which the table says so


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Interleaved A/B runs of the actors scenarios: a git revision against "
        "the working tree (or another revision).",
    )
    p.add_argument("base", nargs="?", help="A: a git revision (commit, tag, branch)")
    p.add_argument("--b", default=None, metavar="REV", help="B: a revision (default: the tree)")
    p.add_argument("--pairs", type=int, default=7, help="A/B pairs per scenario (default 7)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the sizes (floors apply)")
    p.add_argument(
        "--scale-for",
        action="append",
        default=[],
        metavar="NAME=X",
        help="the scale of one scenario, overriding --scale (repeatable)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="the scenarios (names, prefixes or globs; comma-separated, repeatable)",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON file to write")
    p.add_argument("--tmpdir", default=None, help="where the databases go (a real disk)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="print a table")
    args = p.parse_args(argv)
    if args.only:
        args.only = [part for item in args.only for part in item.split(",") if part]
    if args.report is None and (args.base is None or not args.only):
        p.error("BASE and --only are required (or --report JSON)")
    return args


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """The selected scenarios at ``--scale``, each at its ``--scale-for`` scale if it has one."""
    chosen = select(build(args.scale), args.only)
    for item in args.scale_for:
        name, _, value = item.partition("=")
        rebuilt = {s.name: s for s in build(float(value))}
        if name not in rebuilt:
            raise SystemExit(f"--scale-for: no scenario named {name!r}")
        chosen = [rebuilt[name] if s.name == name else s for s in chosen]
    bad = [s.name for s in chosen if s.kind != "actors"]
    if bad:
        raise SystemExit(f"only throughput scenarios of actors compare by CPU/msg: not {bad}")
    return chosen


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def checkout(rev: str, into: Path) -> str:
    """Extract ``actors`` and ``benchmarks`` of ``rev`` into ``into``; return the full commit."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    data = subprocess.run(
        ["git", "archive", "--format=tar", commit, "actors", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return commit


def prepare(args: argparse.Namespace, top: Path) -> dict[str, dict[str, Any]]:
    """The two sides' code directories, commits and source hashes."""
    sides: dict[str, dict[str, Any]] = {}
    for side, rev in (("A", args.base), ("B", args.b)):
        code = top / side
        code.mkdir()
        if rev is None:
            digest = snapshot_code(code)
            dirty = bool(_git("status", "--porcelain", "--", "actors", "benchmarks"))
            commit = _git("rev-parse", "HEAD")
            sides[side] = {"rev": "working tree", "commit": commit, "dirty": dirty}
        else:
            commit = checkout(rev, code)
            digest = source_digest(code)
            sides[side] = {"rev": rev, "commit": commit, "dirty": False}
        sides[side].update(code=str(code), actors_source_sha256=digest)
    return sides


def run_pairs(
    args: argparse.Namespace, chosen: list[Scenario], sides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    out = args.out or HERE / "results" / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    info = meta(argparse.Namespace(rounds=args.pairs, scale=args.scale, quick=False, tmpdir=None))
    info.update(sides={k: {x: y for x, y in v.items() if x != "code"} for k, v in sides.items()})
    doc: dict[str, Any] = {
        "meta": info,
        "scenarios": {s.name: {"label": s.label, "params": s.params} for s in chosen},
        "runs": [],
    }
    for pair in range(args.pairs):
        order = ("A", "B") if pair % 2 == 0 else ("B", "A")
        for s in chosen:
            for side in order:
                t0 = time.perf_counter()
                code = Path(sides[side]["code"])
                result = run_one(s, dict(s.params), code, args.tmpdir, args.timeout)
                result.setdefault("wall_s", time.perf_counter() - t0)
                result.update(
                    scenario=s.name,
                    side=side,
                    pair=pair,
                    loadavg=os.getloadavg()[0],
                    at=time.time(),
                )
                doc["runs"].append(result)
                print(
                    f"[pair {pair + 1}/{args.pairs}] {side} {_brief(s.name, result)}",
                    file=sys.stderr,
                    flush=True,
                )
        doc["meta"]["loadavg_end"] = list(os.getloadavg())
        doc["meta"]["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(out)
    print(f"JSON: {out}", file=sys.stderr)
    return doc


def _brief(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{name:<18} ERROR {r['error']}"
    return (
        f"{name:<18} {r['msg_per_s']:>9,.0f} msg/s {r[KEY]:6.2f} us/msg "
        f"({r['elapsed_s']:.1f} s, load {r['loadavg']:.2f})"
    )


def _spread(values: list[float], fmt: str) -> str:
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} [{low}-{high}]"


def table(doc: dict[str, Any]) -> str:
    """One row per scenario: medians [min-max] of A and B, B/A, the per-pair ratios."""
    rows = [
        "| scenario | pairs | CPU µs/msg A | CPU µs/msg B | B/A | per-pair B/A | B>A | "
        "msg/s A | msg/s B | B/A | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name in doc["scenarios"]:
        runs = [r for r in doc["runs"] if r["scenario"] == name and "error" not in r]
        by = {(r["pair"], r["side"]): r for r in runs}
        pairs = sorted({p for p, _ in by if (p, "A") in by and (p, "B") in by})
        if not pairs:
            continue
        a = [by[p, "A"] for p in pairs]
        b = [by[p, "B"] for p in pairs]
        cpu_a, cpu_b = [r[KEY] for r in a], [r[KEY] for r in b]
        rate_a, rate_b = [r["msg_per_s"] for r in a], [r["msg_per_s"] for r in b]
        per_pair = [y / x for x, y in zip(cpu_a, cpu_b, strict=True)]
        ratio = statistics.median(cpu_b) / statistics.median(cpu_a)
        load = [r["loadavg"] for r in a + b]
        rows.append(
            f"| {name} | {len(pairs)} | {_spread(cpu_a, '{:.2f}')} | {_spread(cpu_b, '{:.2f}')} "
            f"| **{ratio:.3f}** | {_spread(per_pair, '{:.3f}')} "
            f"| {sum(y > x for x, y in zip(cpu_a, cpu_b, strict=True))}/{len(pairs)} "
            f"| {_spread(rate_a, '{:,.0f}')} | {_spread(rate_b, '{:,.0f}')} "
            f"| {statistics.median(rate_b) / statistics.median(rate_a):.3f} "
            f"| {min(load):.2f}-{max(load):.2f} |"
        )
        if ratio > THRESHOLD:
            verdicts.append(f"{name}: B costs {ratio - 1:.1%} more CPU per message than A")
    sides = doc["meta"]["sides"]
    head = (
        f"A = {sides['A']['rev']} ({sides['A']['commit'][:10]}), "
        f"B = {sides['B']['rev']} ({sides['B']['commit'][:10]}"
        f"{' + local changes' if sides['B']['dirty'] else ''}); "
        f"medians [min-max]; B>A: pairs where B used more CPU per message"
    )
    tail = verdicts or [f"every scenario within {THRESHOLD - 1:.0%} of A in CPU µs per message"]
    return "\n".join([head, "", *rows, "", *tail])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report is not None:
        print(table(json.loads(args.report.read_text())))
        return 0
    chosen = scenarios(args)
    with tempfile.TemporaryDirectory(prefix="actors-ab-") as top:
        doc = run_pairs(args, chosen, prepare(args, Path(top)))
    print(table(doc))
    return 1 if any("error" in r for r in doc["runs"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
