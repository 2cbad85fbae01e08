"""Launch rules for the one-row W8A8 GEMV (``platforms/triton/w8_gemv.py``), for side-by-side
runs: ``python3 benchmarks/w8_rule.py RULE [bench_quant_llama8b.py options]`` runs
``bench_quant_llama8b.py`` with the GEMV under ``RULE`` and records it as ``w8_rule`` in
``quant_llama8b.json``.

Rules:

- ``default``: :func:`~heteroserve.platforms.triton.w8_gemv.w8_launch_rule` as it stands
  (tuned on the H100: eight rows a program, halved while fewer than two programs a
  multiprocessor; eight warps for fp8 block, four otherwise).
- ``rows16``: the fastest shapes of the H200's kernel sweep
  (``results/h200-20261206-1020-quant_gemv_w8.json``): sixteen rows a program (halved while
  fewer programs than multiprocessors), eight warps where fewer than two programs share a
  multiprocessor, four otherwise. In the decode graph it ran below ``default``: 3-4 points
  of the roofline on an H100 (``results/h100-20261206-1117-w8_ab-*.json``), 1.4-2.0 points on
  the H200 with the fma-chain kernel (``results/h200-20261206-2325-w8_ab-*.json``).
- ``prefetch_l2``: ``default`` with ``W8GemvConfig.prefetch_l2``: before the PDL wait each
  program asks the L2 for the lines of its next tiles (layers of more than one tile a row).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

from heteroserve.platforms.triton import w8_gemv
from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.w8_gemv import ACT_GROUP, W8GemvConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import rule_named  # noqa: E402

_DEFAULT = w8_gemv.choose_w8_config


def _rows16(n: int, k: int, rows: int, device: torch.device,
            act: int = ACT_GROUP) -> W8GemvConfig:
    if device.type == "cpu":
        return _DEFAULT(n, k, rows, device, act)
    sms = multiprocessors(device)
    block_n = 16
    while block_n > 2 and rows * triton.cdiv(n, block_n) < sms:
        block_n //= 2
    warps = 8 if rows * triton.cdiv(n, block_n) < 2 * sms else 4
    return replace(w8_gemv.w8_launch_rule(n, k, rows, sms, act), block_n=block_n,
                   num_warps=warps)


def _prefetch_l2(n: int, k: int, rows: int, device: torch.device,
                 act: int = ACT_GROUP) -> W8GemvConfig:
    return replace(_DEFAULT(n, k, rows, device, act), prefetch_l2=True)


RULES = {"default": _DEFAULT, "rows16": _rows16, "prefetch_l2": _prefetch_l2}


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    w8_gemv.choose_w8_config = rule_named("w8_rule", RULES, rule)


def main() -> int:
    import bench_quant_llama8b

    apply(sys.argv[1])
    return bench_quant_llama8b.main(sys.argv[2:], {"w8_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
