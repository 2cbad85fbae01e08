"""The MoE weight-processing seam: a plugin's fused_moe may keep experts in its own layout
(``process_weights_after_loading(w13, w2)``), called once after loading; the model's output
is unchanged."""

from __future__ import annotations

import types

import pytest
import torch

import heteroserve.core.model_runner.build as build
from heteroserve.conformance.bisect import trace_prefill
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.plugin_api import (
    FUSED_MOE, MOE_PROCESS_WEIGHTS_ATTR, KernelSpec, hookimpl, torch_native,
)


class TransposedExperts:
    """fused_moe over experts stored transposed (``w13 [E, H, 2I]``, ``w2 [E, I, H]``)."""

    calls = 0

    def process_weights_after_loading(self, w13: torch.Tensor, w2: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        TransposedExperts.calls += 1
        return w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()

    def __call__(self, x, w13, w2, topk_weights, topk_ids):
        return torch_native(FUSED_MOE)(x, w13.transpose(1, 2), w2.transpose(1, 2),
                                       topk_weights, topk_ids)


def _plugin() -> types.SimpleNamespace:
    @hookimpl
    def heteroserve_register_kernels(registry) -> None:
        registry.register(KernelSpec(op=FUSED_MOE, name="transposed", load=TransposedExperts,
                                     platforms=("cpu",), priority=10))

    return types.SimpleNamespace(heteroserve_register_kernels=heteroserve_register_kernels,
                                 HETEROSERVE_PLUGIN_API="1.0")


def test_processed_experts_give_the_same_logits(tmp_path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert hasattr(TransposedExperts(), MOE_PROCESS_WEIGHTS_ATTR)
    plugin = _plugin()
    monkeypatch.setattr(build, "load_plugins", lambda: load_plugins([("transposed", plugin)]))
    model = str(build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=1))
    before = TransposedExperts.calls
    ours = trace_prefill(model, "cpu", "float32", {FUSED_MOE: "transposed"})
    layers = TransposedExperts.calls - before
    ref = trace_prefill(model, "cpu", "float32", {FUSED_MOE: "torch_native"})
    assert layers >= 1
    assert ours.chosen[FUSED_MOE] == "transposed"
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-5, atol=1e-5)
