"""The command line: ``python -m actors demo``."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from ._demo import DemoOptions, run_demo


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m actors",
        description="Embedded, durable, per-key actors for trio on SQLite.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = DemoOptions()
    demo = commands.add_parser(
        "demo",
        help="run a chaos workload and verify that nothing was lost",
        description=(
            "Many sessions send concurrently; the handler sleeps, sometimes fails, rarely "
            "hangs; random busy actors are killed mid-message. At the end every id that "
            "send() returned must have been processed or dead-lettered. "
            "Exit status 1 if anything was lost or an ordering check failed."
        ),
    )
    demo.add_argument(
        "--db",
        metavar="PATH",
        help="SQLite file to use (kept afterwards; default: a fresh file in a temporary "
        "directory, deleted at the end). Reuse a file after killing a run to see recovery.",
    )
    demo.add_argument(
        "--sessions", type=_positive_int, default=defaults.sessions, help="%(default)s"
    )
    demo.add_argument(
        "--messages",
        type=_positive_int,
        default=defaults.messages,
        help="messages per session (%(default)s)",
    )
    demo.add_argument("--seed", type=int, help="seed for the workload's randomness")
    demo.add_argument(
        "--fail-rate",
        type=_rate,
        default=defaults.fail_rate,
        help="chance that an attempt raises (%(default)s)",
    )
    demo.add_argument(
        "--poison-rate",
        type=_rate,
        default=defaults.poison_rate,
        help="chance that a message fails on every attempt (%(default)s)",
    )
    demo.add_argument(
        "--kill-interval",
        type=_seconds,
        default=defaults.kill_interval,
        metavar="SECONDS",
        help="mean time between kills of a busy actor (%(default)s)",
    )
    demo.add_argument(
        "--verbose", action="store_true", help="show the library's log (every failed attempt)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The demo fails on purpose; without --verbose keep the library's log quiet.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    options = DemoOptions(
        db=args.db,
        sessions=args.sessions,
        messages=args.messages,
        seed=args.seed,
        fail_rate=args.fail_rate,
        poison_rate=args.poison_rate,
        kill_interval=args.kill_interval,
    )
    try:
        report = trio.run(run_demo, options)
    except KeyboardInterrupt:
        print("\ninterrupted: unfinished messages stay in the database (see --db)")
        return 130
    print(f"\nverification after {report.seconds:.1f}s")
    print(report.table())
    if report.ok:
        print("\nOK: every acknowledged message was processed or dead-lettered, in order.")
        return 0
    print("\nFAILED: see the non-zero checks above.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
