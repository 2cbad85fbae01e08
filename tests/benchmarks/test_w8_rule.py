"""``benchmarks/w8_rule.py``: each rule's launch shapes, and the run it hands to
``bench_quant_llama8b.py`` tagged with the rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import w8_rule  # noqa: E402

from heteroserve.platforms.triton import w8_gemv  # noqa: E402
from heteroserve.platforms.triton.w8_gemv import ACT_GROUP, ACT_TENSOR, W8GemvConfig  # noqa: E402


def test_rows16_shapes_of_the_h200_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 rows x 2048 columns at Llama-3.1-8B's layers on 132 multiprocessors; eight warps
    where fewer than two programs share one (o / down: N = 4096), four otherwise; fewer rows
    only for layers narrower than one program a multiprocessor."""
    monkeypatch.setattr(w8_rule, "multiprocessors", lambda device: 132)
    gpu = torch.device("cuda", 0)  # only its type is read
    assert w8_rule._rows16(6144, 4096, 1, gpu, ACT_GROUP) == W8GemvConfig(16, 2048, 4, 1)
    assert w8_rule._rows16(4096, 4096, 1, gpu, ACT_TENSOR) == W8GemvConfig(16, 2048, 8, 1)
    assert w8_rule._rows16(28672, 4096, 1, gpu, ACT_GROUP) == W8GemvConfig(16, 2048, 4, 1)
    assert w8_rule._rows16(4096, 14336, 1, gpu, ACT_GROUP) == W8GemvConfig(16, 2048, 8, 1)
    assert w8_rule._rows16(1024, 2048, 1, gpu, ACT_GROUP) == W8GemvConfig(4, 2048, 8, 1)
    assert w8_rule._rows16(4096, 4096, 4, gpu, ACT_GROUP) == W8GemvConfig(16, 2048, 4, 1)
    cpu = torch.device("cpu")
    assert w8_rule._rows16(4096, 4096, 1, cpu) == w8_gemv.choose_w8_config(4096, 4096, 1, cpu)


def test_prefetch_l2_is_the_default_shape_with_the_prefetch() -> None:
    cpu = torch.device("cpu")
    assert w8_rule._prefetch_l2(4096, 4096, 1, cpu) == W8GemvConfig(16, 128, 1, 1,
                                                                    prefetch_l2=True)


def test_default_is_the_launch_rule() -> None:
    assert w8_gemv.w8_launch_rule(4096, 4096, 1, 132, ACT_GROUP) == W8GemvConfig(8, 2048, 8, 1)
    assert w8_gemv.w8_launch_rule(6144, 4096, 1, 132, ACT_TENSOR) == W8GemvConfig(8, 2048, 4, 1)
    assert w8_rule.RULES["default"] is w8_gemv.choose_w8_config


def test_main_installs_the_rule_and_tags_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_quant_llama8b

    monkeypatch.setattr(w8_gemv, "choose_w8_config", w8_gemv.choose_w8_config)
    seen = []
    monkeypatch.setattr(bench_quant_llama8b, "main",
                        lambda argv, tags: seen.append((argv, tags)) or 0)
    monkeypatch.setattr(sys, "argv", ["w8_rule.py", "rows16", "--num-prompts", "0"])
    assert w8_rule.main() == 0
    assert seen == [(["--num-prompts", "0"], {"w8_rule": "rows16"})]
    assert w8_gemv.choose_w8_config is w8_rule._rows16
    with pytest.raises(SystemExit, match="unknown rule"):
        w8_rule.apply("nope")
