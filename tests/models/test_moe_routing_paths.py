"""The MoE layer's two routing paths: the ``fused_moe`` implementation's routed form
(``MOE_ROUTED_ATTR``: top-k softmax, scaling and shared slots inside the op) where it has one,
else ``moe_topk_softmax`` + the scaling + the shared slots + ``fused_moe``. Both match
transformers for Qwen3-MoE and for DeepSeek-V2-Lite's one-group greedy routing (two shared
experts fused as extra experts, a scaling factor); grouped routing never takes the routed
form."""

from __future__ import annotations

import pytest
import torch
import transformers

from engine_harness import cpu_args
from heteroserve.core.kernels.ops import MOE_ROUTED_ATTR
from heteroserve.core.model_runner.build import build_model_runner, startup_block
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.core.models.tiny import build_tiny_model
from parity import assert_matches


def _hf(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v2_greedy"])
def tiny(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen3_moe":
        return build_tiny_model(tmp, "qwen3_moe", seed=5)
    # V2-Lite's routing: one group, greedy top-k softmax (here with a scaling factor)
    return build_tiny_model(tmp, "deepseek_v2", seed=5, n_group=1, topk_group=1,
                            topk_method="greedy", routed_scaling_factor=1.5)


class _Spy:
    """Wraps a routed form and counts its calls."""

    def __init__(self, routed) -> None:
        self.routed, self.calls = routed, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.routed(*args, **kwargs)


def _moe_layers(runner):
    return [m for m in runner.model.modules() if hasattr(m, "routed_experts")]


def test_routed_form_is_called_and_matches_transformers(tiny, monkeypatch) -> None:
    runner = build_model_runner(cpu_args(tiny))[2]
    fused_moe = runner.dispatch.fused_moe
    spy = _Spy(getattr(fused_moe, MOE_ROUTED_ATTR))
    monkeypatch.setattr(fused_moe, MOE_ROUTED_ATTR, spy)
    assert _moe_layers(runner)
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert "MoE routing: top-k softmax inside fused_moe" in block
    assert_matches(runner, _hf(tiny), 1e-4)
    assert spy.calls > 0


def test_without_a_routed_form_the_layer_routes_and_matches(tiny, monkeypatch) -> None:
    runner = build_model_runner(cpu_args(tiny))[2]
    monkeypatch.delattr(runner.dispatch.fused_moe, MOE_ROUTED_ATTR)
    topk_calls = []
    real = runner.dispatch.moe_topk_softmax
    monkeypatch.setattr(runner.dispatch, "moe_topk_softmax",
                        lambda *a: topk_calls.append(a[1]) or real(*a))
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert "MoE routing: moe_topk_softmax, then fused_moe" in block
    assert_matches(runner, _hf(tiny), 1e-4)
    assert topk_calls


def test_grouped_routing_never_takes_the_routed_form(tmp_path, monkeypatch) -> None:
    path = build_tiny_model(tmp_path / "v2", "deepseek_v2", seed=4)  # 4 groups, keep 2
    runner = build_model_runner(cpu_args(path))[2]
    fused_moe = runner.dispatch.fused_moe
    spy = _Spy(getattr(fused_moe, MOE_ROUTED_ATTR))
    monkeypatch.setattr(fused_moe, MOE_ROUTED_ATTR, spy)
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert "MoE routing: moe_grouped_topk (softmax, 4 groups), then fused_moe" in block
    assert_matches(runner, _hf(path), 1e-4)
    assert spy.calls == 0
