"""Headline workloads (``bench_headline.py``) with fused MoE's grouped path as it was before
the tuned tiles, for a side-by-side run against the default: ``python3
benchmarks/moe_rule.py RULE --out X.json [--workloads ...]``.

``heuristic``: the heuristic tiles (``moe_gemm.moe_configs``) instead of the device's tuned
table. ``torch_align_heuristic``: also the torch alignment (``moe_align.align_pairs_torch``,
fourteen launches) instead of the one-launch kernel: the grouped path before 2026-12-06.
``decode_fold8`` / ``decode_fold16``: the few-token decode kernels (``moe_decode.py``) with
each thread's 8 / 16 adjacent products summed before the accumulator (``DecodeTile.fold``,
off by default), fewer registers a thread. ``default``: as it stands. The JSON records the
rule as ``moe_rule``."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_headline  # noqa: E402

from heteroserve.platforms.triton import moe, moe_decode  # noqa: E402
from heteroserve.platforms.triton.moe_align import align_pairs_torch  # noqa: E402


def _no_table(*args: object) -> None:
    return None


def _decode_fold(fold: int) -> None:
    default = moe_decode.choose_config

    def folded(num_tokens: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
               device: torch.device) -> moe_decode.DecodeConfig:
        cfg = default(num_tokens, top_k, hidden, inter, dtype, device)
        return moe_decode.DecodeConfig(replace(cfg.gate_up, fold=fold),
                                       replace(cfg.down, fold=fold))
    moe_decode.choose_config = folded


def main() -> int:
    rule = sys.argv[1]
    if rule == "default":
        return bench_headline.main_tagged(sys.argv[2:], {"moe_rule": rule})
    if rule in ("decode_fold8", "decode_fold16"):
        _decode_fold(int(rule.removeprefix("decode_fold")))
        return bench_headline.main_tagged(sys.argv[2:], {"moe_rule": rule})
    if rule not in ("heuristic", "torch_align_heuristic"):
        raise SystemExit(f"moe_rule: unknown rule {rule!r}")
    moe.tuned_configs = _no_table
    if rule == "torch_align_heuristic":
        moe.align_pairs = align_pairs_torch
    return bench_headline.main_tagged(sys.argv[2:], {"moe_rule": rule})


if __name__ == "__main__":
    raise SystemExit(main())
