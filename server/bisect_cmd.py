"""``heteroserve bisect --platform X --model DIR``: name the kernel that makes a model's
output on platform X diverge from the cpu reference (see ``heteroserve.conformance.bisect``)."""

from __future__ import annotations

import argparse

from heteroserve.core.kernels.dispatch import parse_kernel_overrides


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bisect", help="find the kernel at fault when a model's output on a "
                                      "platform diverges from the cpu reference")
    p.add_argument("--platform", required=True, help="platform under test")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face model folder (safetensors)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype on the platform under test (the reference is float32)")
    p.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL",
                   help="force an implementation on the platform under test (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when nothing diverges, 1 when something does (the report says what)."""
    from heteroserve.conformance.bisect import bisect, describe

    result = bisect(args.model, args.platform, args.dtype, parse_kernel_overrides(args.kernel))
    for line in describe(result):
        print(line)
    return 0 if result.divergence is None else 1
