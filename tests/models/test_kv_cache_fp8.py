"""``--kv-cache-dtype fp8_e4m3``: the KV pool in fp8 (half the bytes per token of bf16),
logits and greedy output equal to transformers whose attention reads K/V rounded to fp8."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine_harness import cpu_args
from heteroserve.core.model_runner import kv_storage
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from parity import assert_matches


def _fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention over K/V rounded to e4m3fn, as an fp8 cache holds them."""
    key = key.to(torch.float8_e4m3fn).to(query.dtype)
    value = value.to(torch.float8_e4m3fn).to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m"), "qwen3", seed=3)


def test_fp8_kv_cache_matches_transformers_with_fp8_kv(model) -> None:
    _, _, runner = build_model_runner(cpu_args(model, kv_cache_dtype="fp8_e4m3"))
    assert runner.kv.k_caches[0].dtype == torch.float8_e4m3fn
    transformers.AttentionInterface.register("fp8_kv_sdpa", _fp8_kv_attention)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float32, attn_implementation="fp8_kv_sdpa").eval()
    assert_matches(runner, hf, 1e-3)


def test_fp8_pool_holds_twice_the_tokens_of_bf16(model) -> None:
    _, _, runner = build_model_runner(cpu_args(model, kv_cache_dtype="fp8_e4m3"))
    layers = runner.model_config.num_layers
    bf16 = kv_storage.bytes_per_page(runner.backend, layers, torch.bfloat16)
    assert runner.kv.bytes_per_page * 2 == bf16


def test_platform_without_fp8_kv_says_so() -> None:
    from heteroserve.core.kernels.registry import KernelRequest
    from heteroserve.core.plugins.manager import load_plugins

    registry = load_plugins().registry
    req = KernelRequest(platform="cuda", device_type="cuda", dtype=torch.bfloat16,
                        head_size=128, num_q_heads=8, num_kv_heads=2, page_size=16,
                        kv_cache_dtype="fp8_e4m3")
    reasons = {s.name: s.check(req).reason for s in registry.implementations("attention")
               if s.runs_on("cuda") and s.name != "torch_native"}
    # flashinfer does not declare fp8 KV; Triton does, but refuses without an 8.9+ NVIDIA GPU
    assert reasons["flashinfer"].startswith("kv cache dtype fp8_e4m3 not supported")
    assert "fp8_e4m3" in reasons["triton"] and "8.9+" in reasons["triton"]


def test_checkpoint_kv_scales_apply_to_the_fp8_cache(model, tmp_path) -> None:
    """Per-layer ``self_attn.k_scale`` / ``v_scale``: the fp8 cache holds ``k / k_scale``;
    transformers' attention reading ``fp8(k / k_scale) * k_scale`` is the reference. With
    the model-dtype cache the scales change nothing."""
    import shutil

    from safetensors.torch import load_file, save_file

    scaled = tmp_path / "scaled"
    shutil.copytree(model, scaled)
    tensors = load_file(str(scaled / "model.safetensors"))
    scales = {0: (0.3, 1.7), 1: (3.1, 0.45)}  # not powers of two: fp8 rounds differently
    for i, (ks, vs) in scales.items():
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(ks)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(vs)
    save_file(tensors, str(scaled / "model.safetensors"), metadata={"format": "pt"})

    def attention(module, query, key, value, attention_mask, **kwargs):
        ks, vs = scales[module.layer_idx]
        key = (key / ks).to(torch.float8_e4m3fn).to(query.dtype) * ks
        value = (value / vs).to(torch.float8_e4m3fn).to(query.dtype) * vs
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("fp8_kv_scaled_sdpa", attention)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float32, attn_implementation="fp8_kv_scaled_sdpa").eval()
    _, _, runner = build_model_runner(cpu_args(scaled, kv_cache_dtype="fp8_e4m3"))
    assert runner.model.model.layers[1].self_attn.attn.k_scale == pytest.approx(3.1)
    assert_matches(runner, hf, 1e-3)
    _, _, unscaled = build_model_runner(cpu_args(model, kv_cache_dtype="fp8_e4m3"))
    with pytest.raises(AssertionError):  # the scales matter at this tolerance
        assert_matches(unscaled, hf, 1e-3)
    _, _, plain = build_model_runner(cpu_args(scaled))
    assert plain.model.model.layers[1].self_attn.attn.k_scale == 1.0
