"""TP slicing of quantized tensors: packed dims, group scales and zero points split per rank
(column: output features; row: input features and their groups); two ranks give the same
greedy output as one."""

from __future__ import annotations


import pytest

import heteroserve
from heteroserve.core.models.tiny import build_tiny_model
from quant_checkpoints import write_quantized
from platform_under_test import TEST_PLATFORM

PLATFORM = TEST_PLATFORM
PROMPTS = ["Hello world", "The quick brown fox jumps"]
SAMPLING = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


def _generate(path, tp: int) -> list[list[int]]:
    engine = heteroserve.Engine(model_path=str(path), platform=PLATFORM, dtype="float32",
                                max_total_tokens=4096, tp_size=tp)
    try:
        return [r["output_ids"] for r in engine.generate(PROMPTS, SAMPLING)]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("fmt", ["gptq"])  # awq also passes; one format keeps CI short
def test_tp2_quantized_equals_tp1(tmp_path, fmt: str) -> None:
    base = build_tiny_model(tmp_path / "base", "llama", seed=9)
    path, _, _ = write_quantized(base, tmp_path / fmt, fmt, sym=False)
    assert _generate(path, 2) == _generate(path, 1)
