"""A plugin's quantization format on a mixture-of-experts model, and ``--quantization`` naming
a plugin's method: a tiny Qwen3-MoE whose expert and attention projections are stored in the
example plugin's ``example-int8-wo`` format loads (the experts dequantized through the
plugin's ``LinearSchemeSpec``) and matches transformers on the dequantized weights; an
unknown ``--quantization`` is refused in one line, by the engine and by ``heteroserve
serve``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import heteroserve.core.model_runner.build as build
from engine_harness import cpu_args
from example_int8wo import (
    dequantized_int8wo, example_catalog, example_plugin_env, write_int8wo,
)
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.plugin_api import QuantizationError
from parity import assert_matches
from quant_checkpoints import copy_without_weights

SCHEME = "example_int8_wo"
#: every step's logits of fp32 engine vs transformers on the same dense weights
TOL = 2e-5


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = build_tiny_model(tmp_path_factory.mktemp("moe"), "qwen3_moe", seed=2)
    return write_int8wo(base, tmp_path_factory.mktemp("int8wo") / "ckpt")


@pytest.fixture(scope="module")
def reference(moe_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    return dequantized_int8wo(moe_ckpt, tmp_path_factory.mktemp("ref") / "dense")


def _runner(ckpt: Path, **kw):
    return build.build_model_runner(cpu_args(ckpt, **kw))[2]


def test_plugin_format_moe_experts_match_the_dequantized_reference(
        moe_ckpt: Path, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = example_catalog(monkeypatch)
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    names = load_file(moe_ckpt / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.down_proj.qweight" in names  # experts are int8
    runner = _runner(moe_ckpt, quantization="example-int8-wo")
    layer = runner.model.model.layers[0]
    assert layer.mlp.expert_quant.scheme == SCHEME
    assert layer.self_attn.qkv_proj.quant.scheme == SCHEME
    assert layer.self_attn.qkv_proj.weight.dtype == torch.int8
    assert layer.mlp.w13.dtype == torch.float32  # experts dequantized to the model dtype
    # expert 2's up projection is qweight * scales exactly (rows I..2I of w13)
    q = names["model.layers.0.mlp.experts.2.up_proj.qweight"].to(torch.float64)
    s = names["model.layers.0.mlp.experts.2.up_proj.scales"].to(torch.float64)
    inter = layer.mlp.inter
    torch.testing.assert_close(layer.mlp.w13.data[2, inter:].to(torch.float64),
                               q * s[:, None], rtol=1e-7, atol=0)
    assert_matches(runner, reference, TOL)


def test_a_tenth_of_a_percent_scale_error_in_one_expert_fails_the_comparison(
        moe_ckpt: Path, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity check above can fail: the same checkpoint with expert 1's scales (layer 0,
    all three projections) off by 0.1% no longer matches the reference."""
    catalog = example_catalog(monkeypatch)
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    bad = copy_without_weights(moe_ckpt, tmp_path / "bad")
    tensors = load_file(moe_ckpt / "model.safetensors")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        key = f"model.layers.0.mlp.experts.1.{proj}.scales"
        tensors[key] = tensors[key] * 1.001
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(AssertionError, match="step 0"):
        assert_matches(_runner(bad), reference, TOL)


def test_a_plugin_scheme_without_a_definition_is_refused_for_experts(
        moe_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin that registers the format and the kernel but no ``LinearSchemeSpec``: the
    attention layers could run, the experts have nothing to be dequantized with."""
    catalog = dataclasses.replace(example_catalog(monkeypatch), linear_schemes={})
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    with pytest.raises(QuantizationError, match=r"^model\.layers\.0\.mlp\.experts: linear "
                                                r"scheme 'example_int8_wo' has no dequantize "
                                                r"definition [^\n]*$"):
        _runner(moe_ckpt)


def test_an_unknown_quantization_is_refused_with_every_method(
        moe_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = example_catalog(monkeypatch)
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    with pytest.raises(QuantizationError, match=r"^--quantization 'bogus' is not supported; "
                                                r"choose from fp8, compressed-tensors, awq, "
                                                r"gptq, [^\n]*example-int8-wo"):
        _runner(moe_ckpt, quantization="bogus")
    with pytest.raises(QuantizationError, match="--quantization awq does not match"):
        _runner(moe_ckpt, quantization="awq_marlin")  # an alias: the built-in awq


def test_serve_refuses_an_unknown_quantization_in_one_line(moe_ckpt: Path,
                                                           tmp_path: Path) -> None:
    """``heteroserve serve --quantization bogus``: one line on stderr listing the built-in
    and the plugin's methods, a non-zero exit, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "heteroserve.server.cli", "serve", str(moe_ckpt), "--port", "0",
         "--platform", "cpu", "--dtype", "float32", "--max-total-tokens", "1024",
         "--quantization", "bogus"],
        cwd=tmp_path, env=example_plugin_env(tmp_path), capture_output=True, text=True,
        timeout=180)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("heteroserve serve: error: "), lines[0]
    assert "--quantization 'bogus' is not supported; choose from fp8, " in lines[0]
    assert "example-int8-wo" in lines[0]


@pytest.mark.parametrize("dequantize,message", [
    (lambda p: 1 / 0, r"dequantize failed: ZeroDivisionError"),
    (lambda p: torch.zeros(3), r"dequantize returned \[3\], expected a \[\d+, \d+\] tensor"),
], ids=["raises", "wrong-shape"])
def test_a_broken_plugin_dequantize_is_one_line_naming_the_expert(
        moe_ckpt: Path, monkeypatch: pytest.MonkeyPatch, dequantize, message: str) -> None:
    catalog = example_catalog(monkeypatch)
    spec = dataclasses.replace(catalog.linear_schemes[SCHEME], dequantize=dequantize)
    catalog = dataclasses.replace(catalog, linear_schemes={SCHEME: spec})
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.experts\.0\.w\d \(\w+_proj\): "
                                                r"linear scheme 'example_int8_wo' \(plugin "
                                                rf"[^)]+\) {message}") as info:
        _runner(moe_ckpt)
    assert "\n" not in str(info.value)
