"""Models with per-head q/k norms (Qwen3, Qwen3-MoE, Gemma 3) call the fused
``qk_norm_rotary`` op once a layer in place of q_norm, k_norm and rotary; models without
them keep the rotary op; the norm weights load under their checkpoint names (random weights
against transformers)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers

from engine_harness import PagedSequence, cpu_args, extend, randomise_qk_norms
from heteroserve.conformance.bisect import trace_prefill
from heteroserve.core.kernels import ops
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model

PROMPT = [11, 57, 3, 200, 42, 9, 77, 301, 15, 64, 128, 5, 99]


@pytest.mark.parametrize("arch,fused", [("qwen3", True), ("gemma3", True), ("llama", False)])
def test_one_fused_call_a_layer(tmp_path, arch: str, fused: bool) -> None:
    path = build_tiny_model(tmp_path / arch, arch, seed=3)
    trace = trace_prefill(str(path), "cpu", "float32", {})
    layers = 1 + max(c.layer for c in trace.calls)
    per_layer = [Counter(c.op for c in trace.calls if c.layer == i) for i in range(layers)]
    for counts in per_layer:
        assert counts[ops.QK_NORM_ROTARY] == (1 if fused else 0), (arch, counts)
        assert counts[ops.ROTARY] == (0 if fused else 1), (arch, counts)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
@torch.no_grad()
def test_random_norm_weights_match_transformers(tmp_path, arch: str) -> None:
    """Tiny checkpoints hold all-ones q/k norm weights; random ones here check that the fused
    op gets the loaded (for Gemma: the ``1 + w``) weights under the unchanged names."""
    path = build_tiny_model(tmp_path / arch, arch, seed=5)
    randomise_qk_norms(path)
    _, _, runner = build_model_runner(cpu_args(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq = PagedSequence(runner, len(PROMPT) + 1)
    ours = extend(runner, [(PROMPT, 0, seq)])[0]
    ref = hf(torch.tensor([PROMPT])).logits[0, -1]
    assert ((ours - ref).abs().max() / ref.abs().max()).item() < 1e-4
