"""One throughput scenario, once, in this process: for valgrind and profilers.

``python benchmarks/once.py SCENARIO SCALE`` builds the scenario as
``python -m benchmarks --scale SCALE`` would, runs it on a fresh database
in a temporary directory, and prints where ``actors`` came from, the
message count and the messages per commit. No subprocess, no snapshot of
the code: whatever ``actors`` and ``benchmarks`` the path finds first is
what runs, so it works on any checkout, one that predates this file too
(run the file by path with ``PYTHONPATH`` set to that checkout).

Instructions per message, which noise cannot blur::

    cd <checkout> && PYTHONPATH=$PWD valgrind --tool=callgrind \\
        --callgrind-out-file=/dev/null python <this file> many_s100_normal 0.1

and the same at 0.2: the difference of the two totals ("Collected"),
divided by the difference of the message counts, is the cost of one more
message, with the imports, the start and the stop left out. Scenarios
whose sizes scale by sessions (send_s10k_*) do not grow linearly; compare
them at one size, less the instructions of the imports alone.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import actors
from benchmarks import e2e
from benchmarks.scenarios import build


def main(argv: list[str]) -> int:
    name, scale = argv[1], float(argv[2])
    scenarios = {s.name: s for s in build(scale)}
    scenario = scenarios.get(name)
    if scenario is None or scenario.kind != "actors":
        print(f"no throughput scenario {name!r}; see python -m benchmarks --list", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="actors-once-") as d:
        result = e2e.run_throughput(scenario.params, os.path.join(d, "bench.db"))
    shown = {k: result[k] for k in ("messages", "msgs_per_commit", "cpu_us_per_msg")}
    print(actors.__file__, json.dumps(shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
