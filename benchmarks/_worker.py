"""One scenario in a fresh process: ``python -m benchmarks._worker '<json>'``.

The argument is ``{"kind": ..., "params": {...}, "dir": "<empty temp dir>"}``.
The last line of stdout is ``BENCH-RESULT <json>``: the figures, or
``{"error": ...}`` / ``{"skipped": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

MARKER = "BENCH-RESULT "


def run(kind: str, params: dict[str, Any], directory: str) -> dict[str, Any]:
    db = os.path.join(directory, "bench.db")
    if kind == "raw":
        from benchmarks import raw

        return raw.run(params, db)
    if kind == "store_sql":
        from benchmarks import store_sql

        return store_sql.run(params, db)
    if kind == "actors":
        from benchmarks import e2e

        return e2e.run_throughput(params, db)
    if kind == "latency":
        from benchmarks import e2e

        return e2e.run_latency(params, db)
    if kind == "peer":
        from benchmarks import peers

        try:
            return peers.run(params, directory)
        except peers.NotInstalledError as exc:
            return {"skipped": f"not installed ({exc}); pip install -e '.[bench]'"}
    raise ValueError(f"unknown scenario kind {kind!r}")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    try:
        import actors

        # The runner starts workers in a snapshot of the code: measure that one.
        here = os.path.realpath(os.getcwd())
        if not os.path.realpath(actors.__file__).startswith(here + os.sep):
            raise RuntimeError(f"actors imported from {actors.__file__}, not from {here}")
        result = run(spec["kind"], spec["params"], spec["dir"])
    except BaseException as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
