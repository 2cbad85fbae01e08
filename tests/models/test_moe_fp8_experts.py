"""fp8-block MoE experts stay fp8 in memory (weight-only through ``fused_moe``) where the
resolved implementation runs them and the block scales stay whole; otherwise they are
dequantized at load, and the start-up block says which and why."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_harness import cpu_args
from heteroserve.core.model_runner.build import build_model_runner, startup_block
from heteroserve.core.models.config import ModelLoadError
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from parity import assert_matches
from quant_checkpoints import dequantized_reference, write_quantized


def _runner(path, **kw):
    return build_model_runner(cpu_args(path, **kw))[2]


def _block(path, inter: int):
    return build_tiny_model(path, "qwen3_moe", seed=2, moe_intermediate_size=inter)


def _expert_bytes(moe: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in moe.named_parameters()
               if not name.startswith("gate."))


def test_qwen3_moe_fp8_block_experts_stay_fp8_and_match_transformers(tmp_path) -> None:
    path, scheme, group = write_quantized(_block(tmp_path / "moe", 128), tmp_path / "ckpt",
                                          "fp8-block")
    runner = _runner(path)
    moe = runner.model.model.layers[0].mlp
    assert moe.storage.kept and moe.storage.scheme == "fp8_block"
    assert moe.w13.dtype == moe.w2.dtype == torch.float8_e4m3fn
    experts, inter, hidden = moe.w13.shape[0], moe.inter, moe.hidden
    assert moe.w13_scale.shape == (experts, 2, 1) and moe.w2_scale.shape == (experts, 1, 1)
    assert moe.w13_scale.dtype == moe.w2_scale.dtype == torch.float32
    assert moe.weight_quant is not None and moe.weight_quant.w13_scale is moe.w13_scale
    dense = 3 * experts * inter * hidden * torch.finfo(runner.model_config.dtype).bits // 8
    assert _expert_bytes(moe) < dense / 3  # fp8 plus scales against fp32 experts
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert "experts fp8_block kept (weight-only through fused_moe" in block
    hf = dequantized_reference(path, scheme, group, tmp_path)
    assert_matches(runner, hf, 2e-2)


def test_unaligned_intermediate_size_dequantizes_and_says_why(tmp_path) -> None:
    """``I = 96``: the up half of ``w13`` would start inside a scale block."""
    path, _, _ = write_quantized(_block(tmp_path / "moe", 96), tmp_path / "ckpt", "fp8-block")
    runner = _runner(path)
    moe = runner.model.model.layers[0].mlp
    assert not moe.storage.kept and moe.weight_quant is None
    assert moe.w13.dtype == runner.model_config.dtype and not hasattr(moe, "w13_scale")
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    assert ("experts fp8_block dequantized to float32: the per-rank moe intermediate size 96 "
            "(tp 1) is not a multiple of 128") in block


def test_implementation_without_the_scheme_dequantizes(tmp_path, monkeypatch) -> None:
    """A ``fused_moe`` that declares no expert schemes gets dense experts (and no ``quant``)."""
    from heteroserve.platforms.cpu import moe as cpu_moe

    calls = []
    original = cpu_moe.fused_moe

    def dense_only(x, w13, w2, topk_weights, topk_ids):
        calls.append(w13.dtype)
        return original(x, w13, w2, topk_weights, topk_ids)

    monkeypatch.setattr(cpu_moe, "fused_moe", dense_only)
    path, scheme, group = write_quantized(_block(tmp_path / "moe", 128), tmp_path / "ckpt",
                                          "fp8-block")
    runner = _runner(path)
    moe = runner.model.model.layers[0].mlp
    assert not moe.storage.kept and "does not run fp8_block experts" in moe.storage.reason
    hf = dequantized_reference(path, scheme, group, tmp_path)
    assert_matches(runner, hf, 2e-2)
    assert calls and set(calls) == {torch.float32}


@pytest.mark.parametrize("tensor,shape", [
    ("model.layers.1.mlp.experts.2.up_proj.weight_scale_inv", (2, 1)),
    ("model.layers.0.mlp.experts.0.down_proj.weight_scale_inv", (1, 2)),
])
def test_wrong_shape_expert_scale_fails_naming_the_tensor(tmp_path, tensor, shape) -> None:
    path, _, _ = write_quantized(_block(tmp_path / "moe", 128), tmp_path / "ckpt", "fp8-block")
    tensors = load_file(str(path / "model.safetensors"))
    tensors[tensor] = torch.ones(shape, dtype=torch.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        _runner(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"checkpoint tensor {tensor}: weight_scale_inv has shape {list(shape)}, "
                   "expected [1, 1]")
