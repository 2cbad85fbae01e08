"""``benchmarks/decode_chain.py --smoke`` and ``benchmarks/gemv_rule.py``: the chain benchmark
runs every table on the CPU under the Triton interpreter (each launch shape checked against
the float64 product) and writes the JSON the GPU run writes; the tile rules keep the earlier
rule's ``block_n`` and widen only ``block_k``; the GEMV's launch rule itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="--smoke interprets kernels that this session has compiled")
def test_smoke_run_writes_every_table(tmp_path: Path) -> None:
    import decode_chain

    out = tmp_path / "chain.json"
    assert decode_chain.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["rule"] for r in data["chains"]} == set(decode_chain.RULES)
    assert all(r["us_per_layer"] > 0 for r in data["chains"])
    assert {r["linear"] for r in data["shapes"]} == {"a", "b"}
    assert all(r["rel_err"] < 2e-2 for r in data["shapes"] + data["moe"])
    assert sum(r["default"] for r in data["moe"]) == 1 and len(data["moe"]) == 2


def test_tile_rules_widen_block_k_only() -> None:
    import gemv_rule

    from heteroserve.platforms.triton.gemv import GemvConfig

    def fake_default(n: int, k: int, device: torch.device, prologue: int = 0) -> GemvConfig:
        return GemvConfig(2 if n <= 2048 else 8, 512, 4, 1)

    gpu = torch.device("cuda", 0)  # only its type is read
    rule8 = gemv_rule._tile_bytes(8192, fake_default)
    rule16 = gemv_rule._tile_bytes(16384, fake_default)
    assert rule8(2048, 4096, gpu) == GemvConfig(2, 2048, 4, 1)   # 2 x 2048 x 2 B = 8 KiB
    assert rule16(2048, 4096, gpu) == GemvConfig(2, 4096, 4, 1)
    assert rule16(2048, 1000, gpu) == GemvConfig(2, 1024, 4, 1)  # no wider than K needs
    assert rule8(6144, 4096, gpu) == GemvConfig(8, 512, 4, 1)    # already 8 KiB
    assert rule8(2048, 4096, torch.device("cpu")) == GemvConfig(2, 512, 4, 1)
    fold8 = gemv_rule._fold(8, fake_default)
    assert fold8(6144, 4096, gpu) == GemvConfig(8, 512, 4, 1, fold=8)
    assert fold8(6144, 4096, torch.device("cpu")) == GemvConfig(8, 512, 4, 1)
    with pytest.raises(SystemExit, match="unknown rule"):
        gemv_rule.apply("nope")


def test_gemv_tiles_four_features_and_wide_steps() -> None:
    from heteroserve.platforms.triton.gemv import RMS_NORM, GemvConfig, gemv_tiles

    assert gemv_tiles(2048, 4096, 132) == GemvConfig(4, 2048, 4, 1)     # Qwen3 o_proj
    assert gemv_tiles(28672, 4096, 132) == GemvConfig(4, 2048, 4, 1)    # Llama gate_up
    assert gemv_tiles(128, 2048, 132) == GemvConfig(1, 2048, 4, 1)      # a 128-expert router
    assert gemv_tiles(300, 2048, 132) == GemvConfig(2, 2048, 4, 1)      # 150 programs
    assert gemv_tiles(8192, 1000, 132) == GemvConfig(4, 1024, 4, 1)     # K rounded up
    assert gemv_tiles(8192, 3840, 132) == GemvConfig(4, 2048, 4, 1)     # masked last step
    assert gemv_tiles(64, 8, 132) == GemvConfig(1, 16, 4, 1)
    assert gemv_tiles(6144, 4096, 132, RMS_NORM) == GemvConfig(16, 512, 4, 1)
