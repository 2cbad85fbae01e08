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


def _layer(tp_size: int, tp_rank: int, inter: int, fp8_dtype=torch.float8_e4m3fn):
    """A bare fp8-block FusedMoE (4 experts, H = 200) on the cpu dispatch table."""
    from heteroserve.core.kernels.dispatch import resolve_dispatch
    from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest
    from heteroserve.core.layers.context import LayerContext
    from heteroserve.core.layers.moe import FusedMoE
    from heteroserve.core.quantization.fp8 import Fp8Format
    from heteroserve.platforms.cpu import plugin

    registry = KernelRegistry()
    plugin.heteroserve_register_kernels(registry)
    table = resolve_dispatch(registry, KernelRequest("cpu", "cpu", torch.float32),
                             linear_schemes=("unquantized", "fp8_block"))
    quant = Fp8Format({"quant_method": "fp8", "weight_block_size": [128, 128]})
    ctx = LayerContext(table, torch.float32, torch.device("cpu"), tp_rank, tp_size,
                       quant=quant, fp8_dtype=fp8_dtype)
    return FusedMoE(ctx, 4, 2, 200, inter, True, prefix="model.layers.0.mlp")


def test_tensor_parallel_rank_takes_whole_scale_blocks() -> None:
    """I = 256 over tp 2: rank 1 holds rows 128..255 of gate and up (scale row 1 of each)
    and columns 128..255 of down (scale column 1), and computes its share of the sum."""
    from heteroserve.conformance.quantize import quantize_fp8_block_experts
    from heteroserve.platforms.cpu.moe import fused_moe

    g = torch.Generator().manual_seed(0)
    layer = _layer(2, 1, 256)
    assert layer.storage.kept and layer.w13.shape == (4, 256, 200)
    assert layer.w13_scale.shape == (4, 2, 2) and layer.w2_scale.shape == (4, 2, 1)
    full = {n: torch.randn(4, *shape, generator=g, dtype=torch.float64) * 0.05
            for n, shape in (("w1", (256, 200)), ("w3", (256, 200)), ("w2", (200, 256)))}
    q = {n: quantize_fp8_block_experts(w) for n, w in full.items()}
    for e in range(4):
        for n in ("w1", "w3", "w2"):
            values, scales, _ = q[n]
            layer.load_quantized(n, "weight_scale_inv", scales[e], e)
            layer.load_quantized(n, "weight", values[e], e)
    layer.check_loaded()
    for n in ("w1", "w3"):  # whole-block slices of the stored values and scales
        rows = slice(0, 128) if n == "w1" else slice(128, 256)
        srow = slice(0, 1) if n == "w1" else slice(1, 2)
        assert torch.equal(layer.w13.data[:, rows].view(torch.uint8),
                           q[n][0][:, 128:].view(torch.uint8))
        assert torch.equal(layer.w13_scale.data[:, srow], q[n][1][:, 1:2])
    assert torch.equal(layer.w2_scale.data, q["w2"][1][:, :, 1:2])
    x = torch.randn(5, 200, generator=g)
    weights = torch.rand(5, 2, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]], dtype=torch.int32)
    deq = {n: t[2] for n, t in q.items()}
    w13 = torch.cat([deq["w1"][:, 128:], deq["w3"][:, 128:]], dim=1)
    ref = fused_moe(x.double(), w13, deq["w2"][:, :, 128:], weights, ids)
    out = layer.experts(x, weights, ids)
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("tp,inter,fp8,reason", [
    (2, 384, torch.float8_e4m3fn, "the per-rank moe intermediate size 192 (tp 2) is not a "
                                  "multiple of 128"),
    (1, 128, torch.float8_e4m3fnuz, "the platform's fp8 flavour is float8_e4m3fnuz (the "
                                    "checkpoint's experts are float8_e4m3fn)"),
    (1, 128, None, "the platform declares no fp8 flavour"),
])
def test_dequantized_with_the_reason(tp, inter, fp8, reason) -> None:
    layer = _layer(tp, 0, inter, fp8)
    assert not layer.storage.kept and layer.storage.reason.startswith(reason)
    assert layer.w13.dtype == torch.float32 and layer.weight_quant is None
