"""``benchmarks/fp8_mm_rule.py``: each rule's cuBLASLt knobs, and the run it hands to
``bench_quant_llama8b.py`` tagged with the rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fp8_mm_rule  # noqa: E402

from heteroserve.platforms.triton import cublas_fp8  # noqa: E402


@pytest.fixture(autouse=True)
def _restore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cublas_fp8, "FAST_ACCUM", set())
    monkeypatch.setattr(cublas_fp8, "BLOCK_SWAP_MAX_N", 0)


def test_rules_set_the_knobs() -> None:
    fp8_mm_rule.apply("fast_swap4096")
    assert cublas_fp8.FAST_ACCUM == {"fp8_per_channel", "fp8_per_tensor"}
    assert cublas_fp8.BLOCK_SWAP_MAX_N == 4096
    fp8_mm_rule.apply("swap4096")
    assert not cublas_fp8.fast_accum("fp8_block") and cublas_fp8.BLOCK_SWAP_MAX_N == 4096
    fp8_mm_rule.apply("default")
    assert cublas_fp8.FAST_ACCUM == set() and cublas_fp8.BLOCK_SWAP_MAX_N == 0
    with pytest.raises(SystemExit, match="unknown rule"):
        fp8_mm_rule.apply("nope")


def test_main_tags_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_quant_llama8b

    seen = []
    monkeypatch.setattr(bench_quant_llama8b, "main",
                        lambda argv, tags: seen.append((argv, tags)) or 0)
    monkeypatch.setattr(sys, "argv", ["fp8_mm_rule.py", "fast", "--num-prompts", "256"])
    assert fp8_mm_rule.main() == 0
    assert seen == [(["--num-prompts", "256"], {"fp8_mm_rule": "fast"})]
    assert cublas_fp8.fast_accum("fp8_per_tensor")
