"""Launch rules for the one-row GEMV (``platforms/triton/gemv.py``), for side-by-side runs:
``benchmarks/decode_chain.py`` times each rule's launches, and ``python3
benchmarks/gemv_rule.py RULE --out X.json [--workloads ...]`` runs the headline workloads
(``bench_headline.py``) with the GEMV under ``RULE``. The JSON records the rule as
``gemv_rule``.

Rules:

- ``default``: :func:`~heteroserve.platforms.triton.gemv.choose_config` as it stands (since
  2026-12-06: four features a program, 2048-column steps).
- ``previous``: the rule before: 512-column steps, and the fewest output features (16 down to
  2) that leave four programs a multiprocessor.
- ``tile8k`` / ``tile16k``: ``previous`` with ``block_k`` raised (up to ``K`` rounded to a
  power of two) until a program's weight tile holds 8 / 16 KiB.
- ``stages2``: ``previous``, software-pipelined over two stages.
- ``fold8``: ``default`` with each thread's eight products of a 16-byte bf16 load summed
  before they join the accumulator (``GemvConfig.fold``): 56 registers a thread at the
  default 4 x 2048 shape against 128 (``benchmarks/kernel_sass.py``'s count, sm_90), so
  twice the programs a multiprocessor. On the H200 (2026-12-06 10:13 UTC,
  ``results/h200-20261206-1013-gemv_ab-{default,fold8}.json``) no batch-1 decode row moved
  beyond run-to-run spread, so it is not the default.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import triton

from heteroserve.platforms.triton import gemv as gemv_mod
from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.gemv import PLAIN, RMS_NORM, GemvConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import rule_named  # noqa: E402

Rule = Callable[..., GemvConfig]
_DEFAULT: Rule = gemv_mod.choose_config


def _previous(n: int, k: int, device: torch.device, prologue: int = PLAIN) -> GemvConfig:
    if device.type == "cpu":
        return _DEFAULT(n, k, device, prologue)
    block_n = 16
    while prologue != RMS_NORM and block_n > 2 and \
            triton.cdiv(n, block_n) < 4 * multiprocessors(device):
        block_n //= 2
    return GemvConfig(block_n, 512 if k >= 512 else triton.next_power_of_2(max(k, 16)), 4, 1)


def _tile_bytes(target: int, base: Rule = _previous) -> Rule:
    def rule(n: int, k: int, device: torch.device, prologue: int = PLAIN) -> GemvConfig:
        cfg = base(n, k, device, prologue)
        if device.type == "cpu":
            return cfg
        wide = min(triton.next_power_of_2(k), target // (2 * cfg.block_n))
        return replace(cfg, block_k=max(cfg.block_k, wide))
    return rule


def _stages2(n: int, k: int, device: torch.device, prologue: int = PLAIN) -> GemvConfig:
    cfg = _previous(n, k, device, prologue)
    return cfg if device.type == "cpu" else replace(cfg, num_stages=2)


def _fold(fold: int, base: Rule = _DEFAULT) -> Rule:
    def rule(n: int, k: int, device: torch.device, prologue: int = PLAIN) -> GemvConfig:
        cfg = base(n, k, device, prologue)
        return cfg if device.type == "cpu" else replace(cfg, fold=fold)
    return rule


RULES: dict[str, Rule] = {"default": _DEFAULT, "previous": _previous,
                          "tile8k": _tile_bytes(8192),
                          "tile16k": _tile_bytes(16384), "stages2": _stages2, "fold8": _fold(8)}


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    gemv_mod.choose_config = rule_named("gemv_rule", RULES, rule)


def main() -> int:
    import bench_headline

    apply(sys.argv[1])
    return bench_headline.main_tagged(sys.argv[2:], {"gemv_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
