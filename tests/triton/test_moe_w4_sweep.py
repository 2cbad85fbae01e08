"""``benchmarks/moe_w4_sweep.py`` on CPU: the launch-shape neighbours and the report of one
interpreted run (every row checked against the float64 product of the dequantized experts)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import moe_w4_sweep as bench  # noqa: E402

from heteroserve.platforms.triton.moe_w4 import W4DecodeConfig, W4Tile  # noqa: E402


def test_neighbours_change_one_knob_of_one_kernel_at_a_time() -> None:
    default = W4DecodeConfig(W4Tile(4, 16), W4Tile(2, 8))
    out = bench.neighbours(default)
    assert out[0] == default and len(out) == len(set(out)) == 11
    for cfg in out[1:]:
        assert (cfg.gate_up == default.gate_up) != (cfg.down == default.down)


def test_smoke_run_times_both_paths_and_every_shape_is_exact() -> None:
    report = bench.run([bench.SMOKE_MODEL], (1,), 2, torch.device("cpu"), 1 << 16, 8)
    paths = [r["path"] for r in report["rows"]]
    assert paths[0] == "bf16 decode_moe" and paths.count("w4a16 decode_moe_w4") >= 8
    timed = [r for r in report["rows"] if "us" in r]
    assert all(r["rel_err"] < 1e-5 and r["us"] > 0 for r in timed)
    assert sum(r.get("default", False) for r in report["rows"]) == 1
