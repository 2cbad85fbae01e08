"""``platforms/triton/w4_tma_tuned.py``: the per-device table of shapes that take the
TMA-pipelined 4-bit GEMV, the committed H200 table, the table written from a sweep
(``benchmarks/w4_tma_sweep.py``), and the W4A16 linears' choice between the two kernels
(run under the Triton interpreter where the TMA kernel is chosen)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from heteroserve.platforms.triton import linear_w4a16, w4_tma_tuned
from heteroserve.platforms.triton.w4a16_gemv import w4a16_gemv
from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig, fits

ROOT = Path(__file__).resolve().parents[2]
GPU = torch.device("cuda", 0)  # only its type and index are read


@pytest.fixture
def tuned_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty table folder for a device called ``Test GPU``; caches cleared around."""
    monkeypatch.setattr(w4_tma_tuned, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(w4_tma_tuned, "device_name", lambda device: "Test GPU")
    w4_tma_tuned.load_table.cache_clear()
    w4_tma_tuned.tuned_tma_config.cache_clear()
    yield tmp_path
    w4_tma_tuned.load_table.cache_clear()
    w4_tma_tuned.tuned_tma_config.cache_clear()


def _write(folder: Path, shapes: dict) -> None:
    (folder / "Test_GPU.json").write_text(json.dumps({"device": "Test GPU", "shapes": shapes}))


def test_lookup_by_device_and_shape(tuned_dir: Path) -> None:
    assert w4_tma_tuned.tuned_tma_config(4096, 14336, 128, GPU) is None  # no file
    assert "register-tile GEMV (no w4_tma_tuned/Test_GPU.json)" == w4_tma_tuned.describe(GPU)
    w4_tma_tuned.load_table.cache_clear()
    w4_tma_tuned.tuned_tma_config.cache_clear()
    _write(tuned_dir, {"N=4096 K=14336 group=128": {"config": [32, 256, 8, 4],
                                                   "prefetch_l2": True}})
    assert w4_tma_tuned.tuned_tma_config(4096, 14336, 128, GPU) == W4TmaConfig(
        32, 256, 8, 4, prefetch_l2=True)
    assert w4_tma_tuned.tuned_tma_config(4096, 14336, 64, GPU) is None  # another group
    assert w4_tma_tuned.tuned_tma_config(4096, 14336, 128, torch.device("cpu")) is None
    assert "1 tuned shape(s)" in w4_tma_tuned.describe(GPU)


def test_an_entry_the_kernel_cannot_take_is_ignored(tuned_dir: Path) -> None:
    """N = 4094: the descriptor's row stride would not be 16-byte aligned."""
    _write(tuned_dir, {"N=4094 K=4096 group=128": {"config": [16, 256, 4, 2]}})
    assert w4_tma_tuned.tuned_tma_config(4094, 4096, 128, GPU) is None


@pytest.mark.parametrize("config", [[16, 256, 4], [16, 256, 4, 0], "16x256", [16.0, 256, 4, 2]])
def test_malformed_entries_fail_by_name(tuned_dir: Path, config: object) -> None:
    _write(tuned_dir, {"N=4096 K=4096 group=128": {"config": config}})
    with pytest.raises(ValueError, match="N=4096 K=4096 group=128"):
        w4_tma_tuned.load_table(tuned_dir / "Test_GPU.json")


def test_committed_h200_table_loads_and_fits() -> None:
    table = w4_tma_tuned.load_table(w4_tma_tuned.table_file("NVIDIA H200"))
    assert len(table) == 4
    for key, cfg in table.items():
        n, k, group = (int(part.split("=")[1]) for part in key.split())
        assert fits(n, k, group, cfg.block_kw), key


def test_sweep_writes_only_the_shapes_where_tma_won(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import w4_tma_sweep

    cfg = {"block_n": 32, "block_kw": 256, "num_warps": 8, "num_stages": 4,
           "nibble": "subnormal"}
    sweep = {"device": "Test GPU", "date": "d", "command": "c", "rows": [
        {"shape": "down", "N": 4096, "K": 14336, "path": "reg_tile", "us": 16.0},
        {"shape": "down", "N": 4096, "K": 14336, "path": "tma_best", "us": 12.8, "config": cfg},
        {"shape": "o", "N": 4096, "K": 4096, "group": 64, "path": "reg_tile", "us": 5.9},
        {"shape": "o", "N": 4096, "K": 4096, "group": 64, "path": "tma_best", "us": 5.85,
         "config": cfg}]}  # under 2 % faster: stays out
    table = w4_tma_sweep.tuned_table(sweep, "src.json")
    assert table["shapes"] == {"N=4096 K=14336 group=128": {
        "config": [32, 256, 8, 4], "prefetch_l2": False, "us": 12.8, "reg_tile_us": 16.0}}
    monkeypatch.setattr(w4_tma_tuned, "TUNED_DIR", tmp_path)
    path = w4_tma_sweep.install(sweep, "src.json")
    assert path == tmp_path / "Test_GPU.json"
    assert w4_tma_tuned.load_table(path) == {"N=4096 K=14336 group=128":
                                             W4TmaConfig(32, 256, 8, 4)}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the TMA kernel under TRITON_INTERPRET=1")
def test_linears_take_the_tma_kernel_where_the_table_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``one_row_gemv`` runs the TMA kernel at the table's config (with the device's nibble
    decoding) and the register-tile kernel without an entry; both give the same product."""
    gen = torch.Generator().manual_seed(3)
    n, k, group = 64, 512, 128
    words = torch.randint(-2**31, 2**31, (k // 8, n), generator=gen,
                          dtype=torch.int64).to(torch.int32)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).to(torch.float16)
    scales = (torch.rand(k // group, n, generator=gen) / 8 + 0.01).to(torch.float16)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    calls = []

    def tma(*args, **kwargs):
        calls.append(args[5])
        return real_tma(*args, **kwargs)

    real_tma = linear_w4a16.w4a16_gemv_tma
    monkeypatch.setattr(linear_w4a16, "w4a16_gemv_tma", tma)
    monkeypatch.setattr(linear_w4a16, "tuned_tma_config",
                        lambda n, k, group, device: W4TmaConfig(16, 32, 1, 2, "exponent"))
    y = linear_w4a16.one_row_gemv(x, words, zeros, scales, group, None)
    assert calls == [W4TmaConfig(16, 32, 1, 2, "subnormal")]
    ref = w4a16_gemv(x, words, zeros, scales, group)
    assert ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item() < 8e-3
    monkeypatch.setattr(linear_w4a16, "tuned_tma_config", lambda n, k, group, device: None)
    torch.testing.assert_close(linear_w4a16.one_row_gemv(x, words, zeros, scales, group, None),
                               ref)
    assert len(calls) == 1
