"""AWQ and GPTQ 4-bit MoE experts stay 4-bit in memory (``w4a16`` experts through
``fused_moe``) where the resolved implementation runs them and the groups allow it; act-order
experts are dequantized at load, and the start-up block says which and why."""

from __future__ import annotations

import pytest
import torch

from engine_harness import cpu_args
from heteroserve.core.kernels.ops import dequantize_w4_experts
from heteroserve.core.model_runner.build import build_model_runner, startup_block
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.core.quantization.dequantize import dequantize
from parity import assert_matches
from quant_checkpoints import dequantized_reference, write_quantized


def _runner(path, **kw):
    return build_model_runner(cpu_args(path, **kw))[2]


def _expert_bytes(moe: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in moe.named_parameters()
               if not name.startswith("gate."))


@pytest.mark.parametrize("fmt,opts", [
    ("awq", {}),
    ("gptq", {"desc_act": False, "sym": True}),
    ("gptq", {"desc_act": False, "sym": False, "group": 16}),
], ids=["awq-g32", "gptq-sym-g32", "gptq-asym-g16"])
def test_qwen3_moe_4bit_experts_stay_packed_and_match_transformers(fmt, opts, tmp_path) -> None:
    moe_path = build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=2)
    path, scheme, group = write_quantized(moe_path, tmp_path / "ckpt", fmt, **opts)
    runner = _runner(path)
    moe = runner.model.model.layers[0].mlp
    assert moe.storage.kept and moe.storage.scheme == scheme
    assert moe.storage.moe_scheme == "w4a16" and moe.storage.group_size == group
    experts, inter, hidden = moe.w13.shape[0], moe.inter, moe.hidden
    assert moe.w13.dtype == moe.w2.dtype == torch.int32
    assert moe.w13.shape == (experts, 2 * inter, hidden // 8)
    assert moe.w2.shape == (experts, hidden, inter // 8)
    assert moe.w13_zero.shape == moe.w13_scale.shape == (experts, 2 * inter, hidden // group)
    q = moe.weight_quant
    assert q is not None and q.scheme == "w4a16" and q.group_size == group
    assert q.w13_zero is moe.w13_zero and q.w2_scale is moe.w2_scale
    dense = 3 * experts * inter * hidden * torch.finfo(runner.model_config.dtype).bits // 8
    # 4-bit words plus an fp32 scale and an int8 zero per group, against fp32 experts
    assert _expert_bytes(moe) < dense / 4
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert f"experts {scheme} kept 4-bit (weight-only through fused_moe as w4a16 experts, " \
           f"groups of {group})" in block
    hf = dequantized_reference(path, scheme, group, tmp_path)
    assert_matches(runner, hf, 1e-3)


def test_repacked_expert_equals_the_checkpoint_dequantized(tmp_path) -> None:
    """Each expert's words, scales and zeros mean exactly the checkpoint's weights (the
    gate and up halves of ``w13``, ``w2``), for GPTQ's ``zero - 1`` storage too."""
    from safetensors.torch import load_file

    moe_path = build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=2)
    path, scheme, group = write_quantized(moe_path, tmp_path / "ckpt", "gptq", desc_act=False,
                                          sym=False, group=16)
    tensors = load_file(str(path / "model.safetensors"))
    moe = _runner(path).model.model.layers[0].mlp
    q = moe.weight_quant
    for expert in (0, 3):
        base = f"model.layers.0.mlp.experts.{expert}"

        def ckpt(proj: str) -> torch.Tensor:
            parts = {s: tensors[f"{base}.{proj}.{s}"] for s in ("qweight", "qzeros", "scales")}
            return dequantize(scheme, parts, group)

        w13 = dequantize_w4_experts(moe.w13[expert], q.w13_scale[expert], q.w13_zero[expert],
                                    group)
        w2 = dequantize_w4_experts(moe.w2[expert], q.w2_scale[expert], q.w2_zero[expert], group)
        torch.testing.assert_close(w13, torch.cat([ckpt("gate_proj"), ckpt("up_proj")]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(w2, ckpt("down_proj"), rtol=0, atol=0)


def test_act_order_experts_are_dequantized_and_the_block_says_why(tmp_path) -> None:
    moe_path = build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=2)
    path, _, _ = write_quantized(moe_path, tmp_path / "ckpt", "gptq", desc_act=True)
    runner = _runner(path)
    moe = runner.model.model.layers[0].mlp
    assert not moe.storage.kept and moe.weight_quant is None
    assert moe.w13.dtype == runner.model_config.dtype
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert "experts gptq_w4a16 dequantized to float32: act-order (desc_act) experts " \
           "permute their input features" in block


def test_groups_straddling_a_rank_share_dequantize(tmp_path) -> None:
    """At ``--tp-size 2`` each rank holds 48 of the 96 intermediate features: groups of 32
    would straddle two ranks, so the experts are dequantized, and the reason says so."""
    from heteroserve.core.layers.moe import expert_storage

    moe_path = build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=2)
    path, _, _ = write_quantized(moe_path, tmp_path / "ckpt", "awq")
    moe = _runner(path).model.model.layers[0].mlp
    assert expert_storage(moe.ctx, moe.expert_quant, 96, moe.hidden).kept
    storage = expert_storage(moe.ctx, moe.expert_quant, 48, moe.hidden)
    assert not storage.kept
    assert storage.reason.startswith("group size 32 is not a multiple of 8 dividing the "
                                     "hidden size 128 and the per-rank moe intermediate "
                                     "size 48")
