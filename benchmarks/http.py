"""Durable sends over HTTP against the HTTP stack's own ceiling: ``python -m benchmarks.http``.

Issue 19's performance targets, in one run:

- ``actors``: ``actors serve`` (a fresh subprocess per run: an SQLite file
  in a temporary directory, durability ``normal``, a no-op handler, a
  token file) receiving ``POST /v1/sessions/s{k}/messages`` with the body
  ``{"body": {"n": 1}}`` over ``--sessions`` sessions (100), from
  ``--connections`` keep-alive connections (64) of ``wrk`` (Debian's, one
  thread by default: the machine has 2 cores, the server takes one), its
  Lua script rotating the session in the path. Each ``202`` was answered
  after ``send()`` returned: the message committed to the database. The
  handler runs them on the same loop meanwhile (the server's ``processed``
  count, read from ``/v1/status`` once the backlog drained, is reported).
- ``ceiling``: benchmarks/http_ceiling.py, the same stack answering ``202
  {"id": n}`` without persisting: the very ``HttpApp`` of ``actors.http``
  (routes, status counting, token guard, body limit, JSON parse and depth
  check, envelope and body checks) served by ``actors.http.serve``
  (hypercorn's trio worker, the same config), over a stand-in system whose
  ``send`` returns the next integer at once. It excludes what a durable
  send is: the transaction, its commit, the handler's dispatch, the
  acknowledgement, the store's background work (and the Prometheus
  collector ``actors serve`` attaches when the extra is installed).
- ``ceiling_wait``: the same, its ``send`` sleeping ``--ceiling-wait-ms``
  (5) before it answers, on no CPU. Under a closed loop an immediate answer
  gets the next request of its connection alone; a send that waits, as a
  durable one waits for its group commit, lets the requests of many
  connections be served together, at less CPU per request (measured: the
  immediate ceiling is *below* actors on this machine). The stack's
  ceiling is the better median of the two; the ratio is taken against it
  (and shown against each).

Rounds (``--rounds``, 3) interleave them (ceiling, ceiling_wait, actors,
ceiling, ...), each a fresh server process, ``--warmup`` seconds of wrk (1) then
``--seconds`` measured (5). Reported: the median [min-max] of wrk's
requests/s, its latency percentiles (closed loop at full load: queueing,
not a target), the server's CPU per request (from /proc: all its threads),
and the ratio of the medians actors/ceiling (target >= 0.70).

Then latency at half load: a fresh ``actors serve``, benchmarks/http_paced.py
offering half the median actors req/s, open loop, over the same number of
connections, for ``--latency-seconds`` (5) after the warm-up; p50/p99 from
each request's scheduled time (target: p99 < 20 ms). If the client could
keep its schedule (its own lag, a CPU share near 100%, fewer requests than
offered), its lag is in the figure (a request is timed from when it was
due): a p99 under the target still passes, one over it says UNSURE.

The table goes to stdout, the JSON to ``--out`` (default
``benchmarks/results/http-<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import http_paced
from benchmarks.run import _git, _version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKEN = "bench-" + "b" * 32
BODY = b'{"body": {"n": 1}}'
HANDLERS = "async def handle(ctx, msg):\n    return None\n"
KINDS = ("ceiling", "ceiling_wait", "actors")
RATIO_TARGET = 0.70
P99_TARGET_MS = 20.0
START_DEADLINE = 30.0

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, "/v1/sessions/s" .. (n %% %(sessions)d) .. "/messages")
end
"""


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.http",
        description="Durable sends over HTTP (actors serve) against the stack's ceiling.",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--seconds", type=int, default=5, help="measured seconds per wrk run (5)")
    p.add_argument("--warmup", type=int, default=1, help="wrk seconds before each (1; 0: none)")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections (64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    p.add_argument("--ceiling-wait-ms", type=float, default=5.0, help="ceiling_wait's wait (5)")
    p.add_argument("--sessions", type=int, default=100, help="sessions rotated over (100)")
    p.add_argument("--latency-seconds", type=float, default=5.0, help="paced seconds (5; 0: none)")
    p.add_argument("--latency-warmup", type=float, default=1.0, help="paced warm-up seconds (1)")
    p.add_argument("--wrk", default="wrk", help="the wrk binary (wrk)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the rounds, one cProfile'd run of each scenario, its .prof to DIR",
    )
    p.add_argument("--out", type=Path, default=None, help="the JSON (default results/http-*.json)")
    return p.parse_args(argv)


# -- servers ------------------------------------------------------------------------


class Server:
    """A server subprocess (actors serve or the ceiling), up once it printed its address."""

    def __init__(
        self, kind: str, workdir: Path, wait_ms: float = 0.0, profile: Path | None = None
    ) -> None:
        self.kind = kind
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{workdir}"}
        python = [sys.executable]
        if profile is not None:
            python += ["-m", "cProfile", "-o", str(profile)]
        if kind == "actors":
            command = [
                *python, "-m", "actors", "serve", str(workdir / "app.db"),
                "--handler", "bench_handlers:handle", "--port", "0",
                "--token-file", str(workdir / "tokens"),
            ]  # fmt: skip
        else:
            command = [
                *python, "-m", "benchmarks.http_ceiling",
                "--port", "0", "--token-file", str(workdir / "tokens"),
                "--wait-ms", str(wait_ms if kind == "ceiling_wait" else 0),
            ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True
        )
        self.url = self._wait_started()

    def _wait_started(self) -> str:
        # A separate OS process: poll its stderr with a deadline.
        assert self.proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], deadline - time.monotonic())
            line = self.proc.stderr.readline() if ready else ""
            lines.append(line)
            if " on http://" in line:
                return line.rsplit(" on ", 1)[1].strip()
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise RuntimeError(f"the {self.kind} server did not start: {''.join(lines)}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (all its threads), from /proc."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def processed(self) -> int | None:
        """The actors server's ``processed`` once its backlog drained (None for the ceiling)."""
        if self.kind != "actors":
            return None
        headers = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + START_DEADLINE
        with httpx.Client(base_url=self.url, headers=headers, timeout=START_DEADLINE) as client:
            while True:  # the server is another process: poll, with a deadline
                status = client.get("/v1/status").json()
                if status["pending"] == 0 and status["in_flight"] == 0:
                    return int(status["processed"])
                if time.monotonic() > deadline:
                    return int(status["processed"])
                time.sleep(0.05)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=START_DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return self.proc.returncode


def workdir(base: Path, sessions: int) -> Path:
    path = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    (path / "tokens").write_text(TOKEN + "\n")
    (path / "bench_handlers.py").write_text(HANDLERS)
    script = WRK_SCRIPT % {"body": BODY.decode(), "token": TOKEN, "sessions": sessions}
    (path / "post.lua").write_text(script)
    return path


# -- wrk ----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures of wrk's output (with --latency)."""
    out: dict[str, Any] = {}
    found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if found is None:
        raise RuntimeError(f"wrk said no request count:\n{text}")
    out["requests"] = int(found.group(1))
    out["req_per_s"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    for q, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text, re.M):
        out[f"p{q}_ms"] = _ms(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    out["socket_errors"] = sum(int(x) for x in errors.groups()) if errors else 0
    return out


def wrk(args: argparse.Namespace, url: str, script: Path, seconds: int) -> tuple[str, float]:
    """wrk's output and its CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [
        args.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s",
        "--latency", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return done.stdout, cpu


def throughput_run(
    args: argparse.Namespace, kind: str, base: Path, profile: Path | None = None
) -> dict[str, Any]:
    work = workdir(base, args.sessions)
    server = Server(kind, work, args.ceiling_wait_ms, profile)
    try:
        warm = (
            parse_wrk(wrk(args, server.url, work / "post.lua", args.warmup)[0])
            if args.warmup
            else None
        )
        cpu0 = server.cpu_seconds()
        text, wrk_cpu = wrk(args, server.url, work / "post.lua", args.seconds)
        server_cpu = server.cpu_seconds() - cpu0
        result = parse_wrk(text)
        answered = result["requests"] + (warm["requests"] if warm else 0)
        processed = server.processed()
    finally:
        code = server.stop()
    requests = max(1, result["requests"])
    return {
        "scenario": kind,
        **result,
        "server_cpu_us_per_req": server_cpu / requests * 1e6,
        "server_cpu_share": server_cpu / args.seconds,
        "wrk_cpu_us_per_req": wrk_cpu / requests * 1e6,
        "answered_with_warmup": answered,
        "processed": processed,
        "exit_code": code,
    }


def latency_run(args: argparse.Namespace, rate: float, base: Path) -> dict[str, Any]:
    work = workdir(base, args.sessions)
    server = Server("actors", work)
    try:
        cpu0 = server.cpu_seconds()
        result = http_paced.run(
            server.url,
            TOKEN,
            rate=rate,
            seconds=args.latency_seconds,
            warmup=args.latency_warmup,
            connections=args.connections,
            sessions=args.sessions,
            body=BODY,
        )
        server_cpu = server.cpu_seconds() - cpu0
    finally:
        code = server.stop()
    span = args.latency_seconds + args.latency_warmup
    return {**result, "server_cpu_share": server_cpu / span, "exit_code": code}


def profiles(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """One run of each scenario with the server under cProfile: its time by package.

    The profile spans the server's whole life (start-up, the wrk runs,
    the stop); the time it waited in epoll is shown apart, the shares are
    of the rest. cProfile slows every call, the small ones most: read the
    shares, not the rate.
    """
    args.profile.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in KINDS:
        path = args.profile / f"http-{kind}.prof"
        run = throughput_run(args, kind, base, path)
        out[kind] = {"req_per_s": run["req_per_s"], "file": str(path), **by_package(path)}
    return out


def by_package(path: Path) -> dict[str, Any]:
    """A profile's own time (tottime) summed by the package of each function."""
    import pstats

    totals: dict[str, float] = {}
    for (filename, _, name), (_, _, own, _, _) in pstats.Stats(str(path)).stats.items():  # type: ignore[attr-defined]
        if "epoll" in name:
            key = "epoll wait"
        elif "site-packages/" in filename:
            key = filename.split("site-packages/")[1].split("/")[0]
        elif f"{os.sep}actors{os.sep}" in filename:
            key = "actors"
        elif filename == "~":
            key = "builtins (C: sockets, apsw, json, ...)"
        else:
            key = "stdlib"
        totals[key] = totals.get(key, 0.0) + own
    waited = totals.pop("epoll wait", 0.0)
    busy = sum(totals.values()) or 1.0
    shares = {k: v / busy for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return {"busy_s": busy, "epoll_wait_s": waited, "shares": shares}


# -- the report ---------------------------------------------------------------------


def spread(runs: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind in KINDS:
        runs = [r for r in rounds if r["scenario"] == kind]
        summary[kind] = {
            key: spread(runs, key)
            for key in (
                "req_per_s",
                "p50_ms",
                "p99_ms",
                "server_cpu_us_per_req",
                "wrk_cpu_us_per_req",
            )
        }
    medians = {k: summary[k]["req_per_s"]["median"] for k in KINDS if summary[k]["req_per_s"]}
    summary["ratios"] = {
        k: medians["actors"] / medians[k] for k in KINDS[:2] if k in medians and "actors" in medians
    }
    summary["ratio"] = min(summary["ratios"].values()) if summary["ratios"] else None
    return summary


def targets(summary: dict[str, Any], latency: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    ratio = summary["ratio"]
    shown = "-"
    if ratio is not None:
        each = ", ".join(f"{v:.0%} of {k}" for k, v in summary["ratios"].items())
        shown = f"{ratio:.0%} ({each})"
    out.append(
        {
            "target": f"actors req/s >= {RATIO_TARGET:.0%} of the stack's ceiling (medians)",
            "value": ratio,
            "shown": shown,
            "verdict": "-" if ratio is None else ("PASS" if ratio >= RATIO_TARGET else "FAIL"),
        }
    )
    if latency is not None:
        p99 = latency["p99_ms"]
        if p99 is None:
            verdict = "FAIL (no answer)"
        elif p99 < P99_TARGET_MS:
            verdict = "PASS"
        elif latency["client_saturated"]:
            verdict = "UNSURE (the client's own lag is in it)"
        else:
            verdict = "FAIL"
        out.append(
            {
                "target": f"p99 < {P99_TARGET_MS:g} ms at half load"
                f" ({latency['rate_offered']:,.0f} req/s)",
                "value": p99,
                "shown": "-" if p99 is None else f"{p99:.2f} ms",
                "verdict": verdict,
            }
        )
    return out


def _cell(entry: dict[str, float] | None, fmt: str) -> str:
    if entry is None:
        return "-"
    return f"{entry['median']:{fmt}} [{entry['min']:{fmt}}-{entry['max']:{fmt}}]"


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"{'scenario':<12} {'req/s':>24} {'wrk p50 ms':>20} {'wrk p99 ms':>22}"
        f" {'server CPU µs/req':>22}"
    ]
    for kind in KINDS:
        s = doc["summary"][kind]
        lines.append(
            f"{kind:<12} {_cell(s['req_per_s'], ',.0f'):>24} {_cell(s['p50_ms'], '.1f'):>20}"
            f" {_cell(s['p99_ms'], '.1f'):>22} {_cell(s['server_cpu_us_per_req'], ',.0f'):>22}"
        )
    lat = doc.get("latency")
    if lat is not None:
        lines.append(
            f"half load: {lat['rate_offered']:,.0f} req/s offered, {lat['requests_answered']:,}"
            f" answered of {lat['requests_offered']:,}; p50 {lat['p50_ms']:.2f} ms,"
            f" p99 {lat['p99_ms']:.2f} ms, max {lat['max_ms']:.2f} ms;"
            f" client lag p99 {lat['client_lag_p99_ms']:.2f} ms, CPU {lat['client_cpu_share']:.0%}"
            if lat["p50_ms"] is not None
            else "half load: no answer"
        )
    acts = [r for r in doc["rounds"] if r["scenario"] == "actors"]
    handled = sum(
        r["processed"] is not None and r["processed"] >= r["answered_with_warmup"] for r in acts
    )
    lines.append(
        f"actors: every 202 handled (processed >= answered) in {handled}"
        f" of {len(acts)} runs; non-2xx {sum(r['non_2xx'] for r in doc['rounds'])},"
        f" socket errors {sum(r['socket_errors'] for r in doc['rounds'])}"
    )
    for kind, prof in (doc.get("profiles") or {}).items():
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(prof["shares"].items())[:6])
        lines.append(f"profile {kind} ({prof['busy_s']:.1f} s busy): {top}")
    lines.append("")
    for t in doc["targets"]:
        lines.append(f"{t['verdict']:<6} {t['target']}: {t['shown']}")
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    wrk_version = subprocess.run([args.wrk, "-v"], capture_output=True, text=True).stdout
    return {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "actors", "benchmarks")),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "wrk": wrk_version.strip().splitlines()[0] if wrk_version.strip() else None,
        "versions": {d: _version(d) for d in ("trio", "hypercorn", "starlette", "h11", "apsw")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "body": BODY.decode(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"http-{stamp}.json"
    doc: dict[str, Any] = {"meta": meta(args), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="actors-http-bench-") as tmp:
        for n in range(args.rounds):
            for kind in KINDS:
                result = {"round": n + 1, **throughput_run(args, kind, Path(tmp))}
                doc["rounds"].append(result)
                print(
                    f"round {n + 1} {kind}: {result['req_per_s']:,.0f} req/s,"
                    f" p99 {result.get('p99_ms', 0):.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        doc["summary"] = summarize(doc["rounds"])
        actors = doc["summary"]["actors"]["req_per_s"]
        doc["latency"] = None
        if args.latency_seconds > 0 and actors:
            doc["latency"] = latency_run(args, actors["median"] / 2, Path(tmp))
        if args.profile is not None:
            doc["profiles"] = profiles(args, Path(tmp))
    doc["targets"] = targets(doc["summary"], doc["latency"])
    doc["meta"]["load_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"\n(JSON: {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
