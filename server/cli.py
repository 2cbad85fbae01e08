"""The ``heteroserve`` command: serve, generate, bench, platforms, conformance, bisect.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and
``run(args) -> int``; this module only wires them and turns expected errors into one
readable line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "serve": "heteroserve.server.serve_cmd",
    "generate": "heteroserve.server.generate_cmd",
    "bench": "heteroserve.server.bench_cmd",
    "platforms": "heteroserve.server.platforms_cmd",
    "conformance": "heteroserve.server.conformance_cmd",
    "bisect": "heteroserve.server.bisect_cmd",
}


class CliError(Exception):
    """An expected failure, reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heteroserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=getattr(args, "log_level", "info").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (CliError, ValueError, RuntimeError, OSError, KeyError, TypeError) as exc:
        if getattr(args, "log_level", "info") == "debug":
            raise
        print(f"heteroserve {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
