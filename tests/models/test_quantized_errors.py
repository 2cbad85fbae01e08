"""Bad quantized checkpoints fail at load with one line naming the tensor or field; the
start-up block names the format and the kernel chosen per scheme."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from engine_harness import cpu_args
from heteroserve.core.model_runner.build import build_model_runner, startup_block
from heteroserve.core.models.config import ModelLoadError
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from quant_checkpoints import write_quantized


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("base"), "llama", seed=1)


def _fails(path, match: str, **kw) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        build_model_runner(cpu_args(path, **kw))
    message = str(info.value)
    assert "\n" not in message
    return message


def _edit_tensors(path, edit) -> None:
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _edit_config(path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_scale_names_the_tensor(base, tmp_path) -> None:
    path, _, _ = write_quantized(base, tmp_path / "c", "fp8-block")
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight_scale_inv"))
    _fails(path, r"model\.layers\.1\.self_attn\.k_proj\.weight_scale_inv is missing")


def test_shape_mismatch_names_the_tensor(base, tmp_path) -> None:
    path, _, _ = write_quantized(base, tmp_path / "c", "awq")

    def shrink(t):
        name = "model.layers.0.mlp.down_proj.scales"
        t[name] = t[name][:-1].contiguous()
    _edit_tensors(path, shrink)
    _fails(path, r"checkpoint tensor model\.layers\.0\.mlp\.down_proj\.scales: scales has shape")


def test_wrong_dtype_names_the_tensor(base, tmp_path) -> None:
    path, _, _ = write_quantized(base, tmp_path / "c", "fp8-block")

    def widen(t):
        name = "model.layers.0.self_attn.o_proj.weight"
        t[name] = t[name].float()
    _edit_tensors(path, widen)
    _fails(path, r"model\.layers\.0\.self_attn\.o_proj\.weight: weight is torch\.float32")


def test_unknown_method_and_options_name_the_field(base, tmp_path) -> None:
    path, _, _ = write_quantized(base, tmp_path / "c", "gptq")
    _edit_config(path, lambda c: c["quantization_config"].update(quant_method="bitsandbytes"))
    _fails(path, r"quant_method='bitsandbytes' is not supported")
    _edit_config(path, lambda c: c["quantization_config"].update(quant_method="gptq", bits=3))
    _fails(path, r"quantization_config\.bits=3")
    _edit_config(path, lambda c: c["quantization_config"].update(bits=4))
    _fails(path, r"--quantization awq does not match", quantization="awq")


def test_incomplete_quantized_expert_names_it(tmp_path) -> None:
    moe = build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=1)
    path, _, _ = write_quantized(moe, tmp_path / "c", "fp8-block")
    _edit_tensors(path, lambda t: t.pop("model.layers.0.mlp.experts.1.down_proj.weight_scale_inv"))
    _fails(path, r"model\.layers\.0\.mlp\.experts\.1\.w2 \(down_proj\) are incomplete")


def test_startup_block_names_format_and_kernel(base, tmp_path) -> None:
    path, _, _ = write_quantized(base, tmp_path / "c", "gptq", desc_act=True)
    platform, dispatch, runner = build_model_runner(cpu_args(path))
    block = startup_block(platform, load_plugins(), dispatch, runner)
    assert "quantization gptq (v1 layout, 4-bit, group 32, desc_act true" in block
    assert "gptq_w4a16           -> torch_native (native)" in block


def test_platforms_explain_resolves_each_quant_scheme() -> None:
    import argparse

    from heteroserve.core.kernels.linear import LINEAR_SCHEMES
    from heteroserve.server.platforms_cmd import describe, quant_schemes

    args = argparse.Namespace(platform="cpu", explain=True, dtype=None, head_size=64,
                              num_q_heads=4, num_kv_heads=2, page_size=None,
                              quant_scheme="all", kernel=[])
    ops = describe(load_plugins(), args)["platforms"]["cpu"]["dispatch"]["ops"]
    for scheme in LINEAR_SCHEMES:
        # plain weights: oneDNN-prepacked where the host runs the dtype natively
        expected = "onednn_prepacked" if scheme == "unquantized" else "torch_native"
        assert ops[f"linear.{scheme}"]["chosen"] == expected
    with pytest.raises(ValueError, match="--quant-scheme awq is not a linear scheme"):
        quant_schemes("awq")


def test_startup_lines_give_the_platform_kernels_reason_for_a_fallback() -> None:
    """On a cuda platform without an fp8-capable GPU, the Triton fp8 kernels refuse and the
    quantization lines say why, next to the torch-native fallback chosen."""
    import torch

    from heteroserve.core.kernels.dispatch import resolve_all
    from heteroserve.core.kernels.registry import KernelRequest
    from heteroserve.core.model_runner.build import linear_schemes, quantization_lines
    from heteroserve.core.quantization import detect_quantization

    quant = detect_quantization({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}, None)
    request = KernelRequest(platform="cuda", device_type="cuda", dtype=torch.bfloat16,
                            head_size=128, num_q_heads=8, num_kv_heads=2, page_size=16,
                            quant_scheme="fp8_block")
    resolutions = resolve_all(load_plugins().registry, request, {}, linear_schemes(quant))
    lines = quantization_lines(quant, resolutions)
    text = "\n".join(lines)
    assert "fp8_block            -> torch_native (fallback)" in text
    assert "triton rejected: " in text
