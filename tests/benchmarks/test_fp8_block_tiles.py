"""``benchmarks/fp8_block_tiles.py``: the tile it installs reaches ``scaled_gemm``, every
candidate computes the same product as the rule's tile (interpreter), and the summary picks
the fastest candidate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fp8_block_tiles  # noqa: E402

from heteroserve.platforms.triton import scaled_gemm as sg  # noqa: E402


def test_tile_installs_and_restores() -> None:
    rule = sg.gemm_config
    with fp8_block_tiles.tile((128, 256, 128, 8, 3)):
        assert sg.gemm_config(8192, 1, True) == (128, 256, 128, 8, 3)
    assert sg.gemm_config is rule
    with fp8_block_tiles.tile(None):
        assert sg.gemm_config is rule


@pytest.mark.parametrize("cand", [c for c in fp8_block_tiles.CANDIDATES if c[0] == 64][:2]
                         + [(128, 64, 128, 4, 4)])
def test_candidates_compute_the_rule_product(cand) -> None:
    """fp32 inputs in place of fp8 (the interpreter's products are exact there): a candidate
    tile over ragged M / N and two K groups equals the rule's tile (the interpreter without a
    GPU: tests/conftest.py)."""
    gen = torch.Generator().manual_seed(0)
    m, n, k = 70, 200, 256
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    sa = torch.rand(m, k // 128, generator=gen) + 0.5
    sb = torch.rand(-(-n // 128), k // 128, generator=gen) + 0.5
    args = (a, b, sa, (sa.stride(0), 1), sb, (sb.stride(0), 1), 128, 128, torch.float32)
    ref = sg.scaled_gemm(*args, per_k_scales=True)
    with fp8_block_tiles.tile(cand):
        out = sg.scaled_gemm(*args, per_k_scales=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_best_tiles_picks_the_fastest() -> None:
    rows = [{"shape": "o_proj", "M": 8192, "bf16_us": 360.0, "cublas_block_us": 395.0,
             "triton": {"[64, 128, 128, 4, 4]": {"us": 610.0, "err_vs_rule": 0.0},
                        "[128, 256, 128, 8, 3]": {"us": 300.0, "err_vs_rule": 1e-3}}},
            {"shape": "o_proj", "M": 256, "bf16_us": 18.0, "cublas_block_us": 21.0,
             "triton": {}}]
    best = fp8_block_tiles.best_tiles(rows)
    assert list(best) == ["o_proj 8192"]
    assert best["o_proj 8192"]["tile"] == [128, 256, 128, 8, 3]
    assert best["o_proj 8192"]["speedup_vs_bf16"] == pytest.approx(1.2)


def test_plot_draws_every_path(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = {"device": "cpu", "date": "now", "best": {"o_proj 8192": {"us": 300.0}},
            "results": [{"shape": "o_proj", "M": 8192, "bf16_us": 360.0,
                         "cublas_block_us": 395.0,
                         "triton": {fp8_block_tiles.RULE_TILE: {"us": 610.0}}}]}
    assert fp8_block_tiles.plot(data, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
