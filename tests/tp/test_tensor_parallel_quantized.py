"""TP slicing of quantized tensors: packed dims, group scales and zero points split per rank
(column: output features; row: input features and their groups); two ranks give the same
greedy output as one."""

from __future__ import annotations

import dataclasses

import pytest

import heteroserve
from engine_harness import cpu_args
from heteroserve.core.layers.moe import expert_storage
from heteroserve.core.model_runner.build import build_model_runner
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


def test_tp2_4bit_moe_experts_kept_equal_tp1(tmp_path) -> None:
    """4-bit experts kept as ``w4a16`` experts at both sizes (groups of 16 divide each rank's
    48 of the 96 intermediate features): ``w13``'s rows and ``w2``'s input features, with
    their group scales and zero points, split per rank."""
    base = build_tiny_model(tmp_path / "base", "qwen3_moe", seed=9)
    path, _, _ = write_quantized(base, tmp_path / "gptq", "gptq", sym=False, group=16)
    moe = build_model_runner(cpu_args(path))[2].model.model.layers[0].mlp
    assert moe.storage.kept and moe.storage.moe_scheme == "w4a16"
    assert expert_storage(dataclasses.replace(moe.ctx, tp_size=2), moe.expert_quant, 48,
                          moe.hidden).kept
    assert _generate(path, 2) == _generate(path, 1)
