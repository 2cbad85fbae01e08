"""``heteroserve conformance --platform NAME [--report DIR]``: run the conformance suite."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conformance", help="run the platform conformance suite (pytest)")
    p.add_argument("--platform", required=True, help="platform name to test")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write conformance-<platform>.json and .md into DIR")
    p.add_argument("--test-timeout", type=float, default=None, metavar="S",
                   help="seconds one test may run before it fails (pytest-timeout; default "
                        "900, 0: no limit)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="extra pytest arguments after --, e.g. -- -k rms_norm -x")
    p.set_defaults(run=run)


PYTEST_MISSING = ("heteroserve conformance needs pytest, which is not installed: "
                  "pip install 'heteroserve[conformance]'")


def run(args: argparse.Namespace) -> int:
    try:
        import pytest  # noqa: F401  (the suite is a pytest plugin)
    except ImportError:
        print(PYTEST_MISSING, file=sys.stderr)
        return 2
    from heteroserve.conformance.runner import DEFAULT_TEST_TIMEOUT_S, run_conformance

    extra = [a for a in args.pytest_args if a != "--"]
    timeout = DEFAULT_TEST_TIMEOUT_S if args.test_timeout is None else args.test_timeout
    return run_conformance(args.platform, args.report, extra, timeout)
