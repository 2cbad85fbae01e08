"""``benchmarks/w4_rule.py``: each rule's launch shapes, and the run it hands to
``bench_quant_llama8b.py`` tagged with the rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import w4_rule  # noqa: E402

from heteroserve.platforms.triton import w4a16_gemv  # noqa: E402
from heteroserve.platforms.triton.w4a16_gemv import W4GemvConfig  # noqa: E402


def test_default_shapes_at_llama_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 KiB tiles of four warps on 132 multiprocessors: 16 columns at qkv / o / down, 32 at
    gate_up; a K whose word rows the tile does not divide gets a smaller tile, fewer warps."""
    monkeypatch.setattr(w4a16_gemv, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda", 0)  # only its type and index are read
    rule = w4a16_gemv.choose_w4_config
    assert rule(6144, 4096, 1, gpu) == W4GemvConfig(16, 256, 4, 1)
    assert rule(28672, 4096, 1, gpu) == W4GemvConfig(32, 128, 4, 1)
    assert rule(4096, 14336, 1, gpu) == W4GemvConfig(16, 256, 4, 1)
    assert rule(4096, 1536, 1, gpu) == W4GemvConfig(16, 64, 1, 1)
    assert w4_rule.RULES["reg_tile"] is w4a16_gemv.choose_w4_config


def test_tiles32k_doubles_the_word_rows_where_they_divide(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w4a16_gemv, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda", 0)
    assert w4_rule._tiles32k(6144, 4096, 1, gpu) == W4GemvConfig(16, 512, 4, 1)
    assert w4_rule._tiles32k(28672, 4096, 1, gpu) == W4GemvConfig(32, 256, 4, 1)
    assert w4_rule._tiles32k(4096, 14336, 1, gpu) == W4GemvConfig(16, 256, 4, 1)  # 1792 rows
    cpu = torch.device("cpu")
    assert w4_rule._tiles32k(4096, 4096, 1, cpu) == w4a16_gemv.choose_w4_config(4096, 4096, 1,
                                                                                  cpu)


def test_prefetch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """``prefetch`` keeps the default shapes; ``prefetch_half`` halves tile and warps until a
    program walks four tiles; ``prefetch_32k`` takes one 32 KiB tile where that is the whole
    slice."""
    monkeypatch.setattr(w4a16_gemv, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda", 0)
    assert w4_rule._prefetch(6144, 4096, 1, gpu) == W4GemvConfig(16, 256, 4, 1, prefetch=True)
    assert w4_rule._prefetch_half(6144, 4096, 1, gpu) == W4GemvConfig(16, 128, 2, 1,
                                                                     prefetch=True)
    assert w4_rule._prefetch_half(28672, 4096, 1, gpu) == W4GemvConfig(32, 128, 4, 1,
                                                                      prefetch=True)
    assert w4_rule._prefetch_32k(6144, 4096, 1, gpu) == W4GemvConfig(16, 512, 4, 1)
    assert w4_rule._prefetch_32k(28672, 4096, 1, gpu) == W4GemvConfig(32, 128, 4, 1,
                                                                     prefetch=True)
    assert w4_rule._prefetch_32k(4096, 14336, 1, gpu) == W4GemvConfig(16, 256, 4, 1,
                                                                     prefetch=True)


def test_whole_slice_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """``whole32k`` takes a 32 KiB tile only where it is a program's whole slice (qkv / o),
    the default elsewhere; ``whole32k_down8`` also gives a long-K layer 8 columns of 512 word
    rows on 8 warps."""
    monkeypatch.setattr(w4a16_gemv, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda", 0)
    assert w4_rule._whole32k(6144, 4096, 1, gpu) == W4GemvConfig(16, 512, 4, 1)
    assert w4_rule._whole32k(28672, 4096, 1, gpu) == W4GemvConfig(32, 128, 4, 1)
    assert w4_rule._whole32k(4096, 14336, 1, gpu) == W4GemvConfig(16, 256, 4, 1)
    assert w4_rule._whole32k_down8(6144, 4096, 1, gpu) == W4GemvConfig(16, 512, 4, 1)
    assert w4_rule._whole32k_down8(28672, 4096, 1, gpu) == W4GemvConfig(32, 128, 4, 1)
    assert w4_rule._whole32k_down8(4096, 14336, 1, gpu) == W4GemvConfig(8, 512, 8, 1)
    cpu = torch.device("cpu")
    assert w4_rule._whole32k_down8(4096, 14336, 1, cpu) == w4a16_gemv.choose_w4_config(
        4096, 14336, 1, cpu)


def test_main_installs_the_rule_and_tags_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_quant_llama8b

    from heteroserve.platforms.triton import linear_w4a16

    monkeypatch.setattr(w4a16_gemv, "choose_w4_config", w4a16_gemv.choose_w4_config)
    monkeypatch.setattr(linear_w4a16, "tuned_gemv_config", linear_w4a16.tuned_gemv_config)
    seen = []
    monkeypatch.setattr(bench_quant_llama8b, "main",
                        lambda argv, tags: seen.append((argv, tags)) or 0)
    monkeypatch.setattr(sys, "argv", ["w4_rule.py", "tiles32k", "--num-prompts", "0"])
    assert w4_rule.main() == 0
    assert seen == [(["--num-prompts", "0"], {"w4_rule": "tiles32k"})]
    assert w4a16_gemv.choose_w4_config is w4_rule._tiles32k
    assert linear_w4a16.tuned_gemv_config(4096, 14336, 128, torch.device("cuda", 0)) is None
    with pytest.raises(SystemExit, match="unknown rule"):
        w4_rule.apply("nope")


def test_tma_rules_replace_the_table_lookup(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``tma`` takes each shape's ``tma_best`` row of the sweep JSON (a fallback config for
    other shapes; none on the CPU); ``tma_pf`` is the device's table with ``prefetch_l2`` at
    its TMA entries, ``tma_only`` without its register-tile entries; ``default`` leaves the
    lookup alone."""
    import json

    from heteroserve.platforms.triton import linear_w4a16
    from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig

    cfg = {"block_n": 32, "block_kw": 128, "num_warps": 4, "num_stages": 4,
           "nibble": "subnormal"}
    table = tmp_path / "w4_tma.json"
    table.write_text(json.dumps({"rows": [
        {"path": "tma", "N": 6144, "K": 4096, "config": {**cfg, "num_stages": 2}},
        {"path": "tma_best", "N": 6144, "K": 4096, "config": cfg}]}))
    assert w4_rule.tma_table(str(table)) == {(6144, 4096): W4TmaConfig(32, 128, 4, 4)}
    assert w4_rule.tma_table(str(tmp_path / "missing.json")) == {}
    monkeypatch.setattr(linear_w4a16, "tuned_gemv_config", linear_w4a16.tuned_gemv_config)
    production = linear_w4a16.tuned_gemv_config
    w4_rule.apply("default")
    assert linear_w4a16.tuned_gemv_config is production
    monkeypatch.setenv("W4_TMA_TABLE", str(table))
    w4_rule.apply("tma")
    gpu = torch.device("cuda", 0)
    lookup = linear_w4a16.tuned_gemv_config
    assert lookup(6144, 4096, 128, gpu) == W4TmaConfig(32, 128, 4, 4)
    assert lookup(4096, 4096, 128, gpu) == W4TmaConfig(16, 256, 4, 3)
    assert lookup(6144, 4096, 128, torch.device("cpu")) is None
    table = {6144: W4TmaConfig(16, 256, 4, 2), 4096: W4GemvConfig(8, 512, 2, 1)}
    monkeypatch.setattr("heteroserve.platforms.triton.w4_gemv_tuned.tuned_gemv_config",
                        lambda n, k, group, device: table.get(n))
    w4_rule.apply("tma_pf")
    assert linear_w4a16.tuned_gemv_config(6144, 4096, 128, gpu) == W4TmaConfig(
        16, 256, 4, 2, prefetch_l2=True)
    assert linear_w4a16.tuned_gemv_config(4096, 4096, 128, gpu) == W4GemvConfig(8, 512, 2, 1)
    w4_rule.apply("tma_only")
    assert linear_w4a16.tuned_gemv_config(6144, 4096, 128, gpu) == W4TmaConfig(16, 256, 4, 2)
    assert linear_w4a16.tuned_gemv_config(4096, 4096, 128, gpu) is None
