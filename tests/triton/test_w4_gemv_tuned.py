"""``platforms/triton/w4_gemv_tuned.py``: the per-device table of the one-row 4-bit GEMV's
kernel and launch shape per weight shape, the committed H200 table, the table written from
sweeps (``benchmarks/w4_tma_sweep.py``), and the W4A16 linears' choice (run under the Triton
interpreter)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from heteroserve.platforms.triton import linear_w4a16, w4_gemv_tuned
from heteroserve.platforms.triton.w4a16_gemv import W4GemvConfig, w4a16_gemv
from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig, fits
from heteroserve.platforms.triton.w4a16_pack import random_packed

ROOT = Path(__file__).resolve().parents[2]
GPU = torch.device("cuda", 0)  # only its type and index are read


@pytest.fixture
def tuned_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty table folder for a device called ``Test GPU``; caches cleared around."""
    monkeypatch.setattr(w4_gemv_tuned, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(w4_gemv_tuned, "device_name", lambda device: "Test GPU")
    w4_gemv_tuned.load_table.cache_clear()
    w4_gemv_tuned.tuned_gemv_config.cache_clear()
    yield tmp_path
    w4_gemv_tuned.load_table.cache_clear()
    w4_gemv_tuned.tuned_gemv_config.cache_clear()


def _write(folder: Path, shapes: dict) -> None:
    (folder / "Test_GPU.json").write_text(json.dumps({"device": "Test GPU", "shapes": shapes}))


def test_lookup_by_device_and_shape(tuned_dir: Path) -> None:
    assert w4_gemv_tuned.tuned_gemv_config(4096, 14336, 128, GPU) is None  # no file
    w4_gemv_tuned.load_table.cache_clear()
    w4_gemv_tuned.tuned_gemv_config.cache_clear()
    _write(tuned_dir, {"N=4096 K=14336 group=128": {"kernel": "tma", "config": [32, 256, 8, 4],
                                                   "prefetch_l2": True},
                       "N=4096 K=4096 group=128": {"kernel": "reg_tile",
                                                  "config": [8, 512, 2, 1]}})
    assert w4_gemv_tuned.tuned_gemv_config(4096, 14336, 128, GPU) == W4TmaConfig(
        32, 256, 8, 4, prefetch_l2=True)
    assert w4_gemv_tuned.tuned_gemv_config(4096, 4096, 128, GPU) == W4GemvConfig(8, 512, 2, 1)
    assert w4_gemv_tuned.tuned_gemv_config(4096, 14336, 64, GPU) is None  # another group
    assert w4_gemv_tuned.tuned_gemv_config(4096, 14336, 128, torch.device("cpu")) is None


def test_an_entry_the_kernel_cannot_take_is_ignored(tuned_dir: Path) -> None:
    """N = 4094: the descriptor's row stride would not be 16-byte aligned."""
    _write(tuned_dir, {"N=4094 K=4096 group=128": {"kernel": "tma", "config": [16, 256, 4, 2]}})
    assert w4_gemv_tuned.tuned_gemv_config(4094, 4096, 128, GPU) is None


@pytest.mark.parametrize("kernel,config", [
    ("tma", [16, 256, 4]), ("tma", [16, 256, 4, 0]), ("reg_tile", "16x256"),
    ("reg_tile", [16.0, 256, 4, 2]), ("magic", [16, 256, 4, 2]), (None, [16, 256, 4, 2])])
def test_malformed_entries_fail_by_name(tuned_dir: Path, kernel: object, config: object) -> None:
    _write(tuned_dir, {"N=4096 K=4096 group=128": {"kernel": kernel, "config": config}})
    with pytest.raises(ValueError, match="N=4096 K=4096 group=128"):
        w4_gemv_tuned.load_table(tuned_dir / "Test_GPU.json")


@pytest.mark.parametrize("device_name,shapes", [("NVIDIA H200", 4),
                                                 ("NVIDIA H100 80GB HBM3", 3)])
def test_committed_tables_load_and_fit(device_name: str, shapes: int) -> None:
    table = w4_gemv_tuned.load_table(w4_gemv_tuned.table_file(device_name))
    assert len(table) == shapes
    for key, cfg in table.items():
        n, k, group = (int(part.split("=")[1]) for part in key.split())
        assert not isinstance(cfg, W4TmaConfig) or fits(n, k, group, cfg.block_kw), key


def test_sweeps_make_a_table_of_each_shapes_fastest_kernel(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per shape the fastest best row of either kernel (TMA sweep, register-tile grid, or
    ``quant_gemv_sweep.py``'s ``sweep_best``) against the first rule row; under 2 % faster
    stays out; sweeps of two devices are refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import w4_tma_sweep

    tma = {"block_n": 32, "block_kw": 256, "num_warps": 8, "num_stages": 4,
           "nibble": "subnormal"}
    reg = {"block_n": 8, "block_kw": 512, "num_warps": 2, "num_stages": 1,
           "nibble": "subnormal", "prefetch": False}
    down, o, qkv = {"N": 4096, "K": 14336}, {"N": 4096, "K": 4096, "group": 64}, \
        {"N": 6144, "K": 4096}
    sweep = {"device": "Test GPU", "date": "d1", "command": "c1", "rows": [
        {**down, "path": "reg_tile", "us": 16.0},
        {**down, "path": "tma_best", "us": 12.8, "config": tma},
        {**o, "path": "reg_tile", "us": 5.9},
        {**o, "path": "tma_best", "us": 5.8, "config": tma},
        {**qkv, "path": "reg_tile", "us": 7.3},
        {**qkv, "path": "tma_best", "us": 7.2, "config": tma},
        {**qkv, "path": "tma", "config": tma, "error": "out of resources"}]}
    grid = {"device": "Test GPU", "date": "d2", "command": "c2", "rows": [
        {**down, "path": "new", "us": 15.0},
        {**down, "path": "sweep_best", "us": 14.0, "config": reg},
        {**o, "path": "sweep_best", "us": 4.75, "config": {**reg, "prefetch": True}},
        {**qkv, "path": "sweep_best", "us": 7.2, "config": reg}]}
    table = w4_tma_sweep.tuned_table([sweep, grid], ["a.json", "b.json"])
    assert table["shapes"] == {
        "N=4096 K=14336 group=128": {"kernel": "tma", "config": [32, 256, 8, 4],
                                     "prefetch_l2": False, "us": 12.8, "rule_us": 16.0},
        "N=4096 K=4096 group=64": {"kernel": "reg_tile", "config": [8, 512, 2, 1],
                                   "prefetch": True, "us": 4.75, "rule_us": 5.9}}
    assert table["sources"] == ["a.json", "b.json"] and table["date"] == "d2"
    with pytest.raises(ValueError, match="several devices"):
        w4_tma_sweep.tuned_table([sweep, {**grid, "device": "Other"}], [])
    monkeypatch.setattr(w4_gemv_tuned, "TUNED_DIR", tmp_path)
    path = w4_tma_sweep.install([sweep, grid], ["a.json", "b.json"])
    assert path == tmp_path / "Test_GPU.json"
    assert w4_gemv_tuned.load_table(path) == {
        "N=4096 K=14336 group=128": W4TmaConfig(32, 256, 8, 4),
        "N=4096 K=4096 group=64": W4GemvConfig(8, 512, 2, 1, prefetch=True)}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the TMA kernel under TRITON_INTERPRET=1")
def test_linears_take_the_tma_kernel_where_the_table_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``one_row_gemv`` runs the kernel of the table's entry at its config (with the device's
    nibble decoding), the register-tile kernel at its rule without one; the same product."""
    gen = torch.Generator().manual_seed(3)
    n, k, group = 64, 512, 128
    words, zeros, scales = random_packed(gen, k, n, group)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    calls = []

    def tma(*args, **kwargs):
        calls.append(args[5])
        return real_tma(*args, **kwargs)

    real_tma = linear_w4a16.w4a16_gemv_tma
    monkeypatch.setattr(linear_w4a16, "w4a16_gemv_tma", tma)
    monkeypatch.setattr(linear_w4a16, "tuned_gemv_config",
                        lambda n, k, group, device: W4TmaConfig(16, 32, 1, 2, "exponent"))
    y = linear_w4a16.one_row_gemv(x, words, zeros, scales, group, None)
    assert calls == [W4TmaConfig(16, 32, 1, 2, "subnormal")]
    ref = w4a16_gemv(x, words, zeros, scales, group)
    assert ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item() < 8e-3
    monkeypatch.setattr(linear_w4a16, "tuned_gemv_config", lambda n, k, group, device: None)
    torch.testing.assert_close(linear_w4a16.one_row_gemv(x, words, zeros, scales, group, None),
                               ref)
    seen = []

    def reg_tile(*args, **kwargs):
        seen.append(kwargs.get("config"))
        return w4a16_gemv(*args, **kwargs)

    monkeypatch.setattr(linear_w4a16, "w4a16_gemv", reg_tile)
    monkeypatch.setattr(linear_w4a16, "tuned_gemv_config",
                        lambda n, k, group, device: W4GemvConfig(8, 16, 1, 1, "exponent"))
    torch.testing.assert_close(linear_w4a16.one_row_gemv(x, words, zeros, scales, group, None),
                               ref)
    assert len(calls) == 1 and seen == [W4GemvConfig(8, 16, 1, 1, "subnormal")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_table_entries_match_float64_on_the_gpu() -> None:
    """Every shape of this GPU's table (none: skipped) through the linears' choice, against
    the float64 product of the dequantized weight."""
    from heteroserve.platforms.triton.w4a16_pack import unpack_rows

    device = torch.device("cuda", torch.cuda.current_device())
    table = w4_gemv_tuned.load_table(w4_gemv_tuned.table_file(torch.cuda.get_device_name()))
    if not table:
        pytest.skip("no w4_gemv_tuned table for this GPU")
    gen = torch.Generator().manual_seed(5)
    for key in table:
        n, k, group = (int(part.split("=")[1]) for part in key.split())
        words, zeros, scales = random_packed(gen, k, n, group, scale_max=1 / 64)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        assert w4_gemv_tuned.tuned_gemv_config(n, k, group, device) is not None, key
        y = linear_w4a16.one_row_gemv(x.to(device), words.to(device), zeros.to(device),
                                      scales.to(device), group, None)
        g = torch.arange(k) // group
        ref = x.double() @ ((unpack_rows(words).double() - zeros.double()[g])
                            * scales.double()[g])
        err = ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err < 8e-3, (key, err)
