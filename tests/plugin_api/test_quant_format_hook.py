"""Plugin-registered quantization formats: the example plugin adds the ``example-int8-wo``
checkpoint format and its linear scheme without touching the core. A tiny checkpoint written
here in that format loads and generates the same greedy tokens as transformers on the
dequantized weights; the conformance suite certifies its kernel against the plugin's scheme
definition; a built-in method or scheme cannot be taken over; without the plugin the format
is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import heteroserve.core.model_runner.build as build
from engine_harness import cpu_args
from example_int8wo import (
    QCFG, dequantized_int8wo, example_catalog, example_plugin_env, write_int8wo,
)
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.core.quantization import detect_quantization
from heteroserve.plugin_api import (
    LinearSchemeSpec, QuantFormatSpec, QuantizationError, hookimpl,
)
from parity import assert_matches


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base"), "llama", seed=3)


def test_plugin_format_loads_and_matches_the_dequantized_reference(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = example_catalog(monkeypatch)
    assert catalog.quant_formats["example-int8-wo"].provider
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    ckpt = write_int8wo(base, tmp_path / "int8wo")
    platform, dispatch, runner = build.build_model_runner(cpu_args(ckpt))
    layers = runner.model.model.layers
    qkv = layers[0].self_attn.qkv_proj
    assert qkv.quant.scheme == "example_int8_wo"
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.shape == (qkv.output_size, 1)
    assert layers[1].mlp.down_proj.quant.scheme == "unquantized"  # ignore honoured
    assert layers[0].mlp.down_proj.quant.scheme == "example_int8_wo"
    assert dispatch.resolutions["linear.example_int8_wo"].chosen.name == "example_int8_wo_torch"
    block = build.startup_block(platform, catalog, dispatch, runner)
    assert "example-int8-wo (weights int8" in block
    assert "example_int8_wo      -> example_int8_wo_torch" in block
    assert_matches(runner, dequantized_int8wo(ckpt, tmp_path / "ref"), 1e-4)


def test_plugin_format_errors_are_one_line(base: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = example_catalog(monkeypatch)
    formats = catalog.quant_formats
    with pytest.raises(QuantizationError, match=r"quantization_config.bits=4: example-int8-wo"):
        detect_quantization({"quantization_config": {**QCFG, "bits": 4}}, None, formats)
    with pytest.raises(QuantizationError, match="does not match"):
        detect_quantization({"quantization_config": QCFG}, "fp8", formats)
    assert detect_quantization({"quantization_config": QCFG}, "example-int8-wo",
                               formats).schemes() == ("example_int8_wo",)
    # without the plugin the format is refused by name
    with pytest.raises(QuantizationError, match="quant_method='example-int8-wo' is not "
                                                "supported; supported: fp8, "):
        detect_quantization({"quantization_config": QCFG}, None, {})
    # a checkpoint missing a tensor is named
    ckpt = write_int8wo(base, tmp_path / "broken")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.scales"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    monkeypatch.setattr(build, "load_plugins", lambda: catalog)
    with pytest.raises(QuantizationError,
                       match=r"model.layers.0.self_attn.o_proj.weight_scale is missing"):
        build.build_model_runner(cpu_args(ckpt))


def _format_plugin(method: str, reader=None) -> types.SimpleNamespace:
    @hookimpl
    def heteroserve_quantization_formats() -> list[QuantFormatSpec]:
        return [QuantFormatSpec(method=method, reader=reader or (lambda cfg: None))]

    return types.SimpleNamespace(heteroserve_quantization_formats=heteroserve_quantization_formats,
                                 HETEROSERVE_PLUGIN_API="1.0")


def test_a_taken_method_refuses_the_plugin_by_name() -> None:
    catalog = load_plugins([("thief", _format_plugin("fp8")), ("a", _format_plugin("toy")),
                            ("b", _format_plugin("toy"))], use_entry_points=False)
    errors = {f.plugin: f.error for f in catalog.failures}
    assert errors["thief"] == "ValueError: quantization format 'fp8' is built in"
    assert errors["b"] == "ValueError: quantization format 'toy' is already provided by in-process"
    assert set(catalog.quant_formats) == {"toy"}
    with pytest.raises(ValueError, match="must be lower case"):
        QuantFormatSpec(method="Bad Name", reader=lambda cfg: None)


def test_a_reader_returning_garbage_is_reported() -> None:
    catalog = load_plugins([("toy", _format_plugin("toy", reader=lambda cfg: 1 / 0))],
                           use_entry_points=False)
    with pytest.raises(QuantizationError, match=r"quant_method 'toy' \(plugin in-process\): "
                                                "reading quantization_config failed: "
                                                "ZeroDivisionError"):
        detect_quantization({"quantization_config": {"quant_method": "toy"}}, None,
                            catalog.quant_formats)


def test_a_plugin_scheme_is_certified_by_the_conformance_suite(tmp_path: Path) -> None:
    """The example's LinearSchemeSpec gives the suite the scheme's definition: its kernel
    runs every linear case (each dtype, with and without bias) against it."""
    env = example_plugin_env(tmp_path)
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "heteroserve.conformance", "--platform",
         "cpu", "--report", str(out), "-q", "-p", "no:cacheprovider", "-k", "example_int8_wo"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((out / "conformance-cpu.json").read_text())
    row, = [r for r in report["table"] if r["op"] == "linear.example_int8_wo"]
    assert row["implementation"] == "example_int8_wo_torch" and row["failed"] == 0
    assert row["passed"] == 6 and row["provider"] == "heteroserve-example-splitkv", row


def _scheme_plugin(name: str) -> types.SimpleNamespace:
    @hookimpl
    def heteroserve_linear_schemes() -> list[LinearSchemeSpec]:
        return [LinearSchemeSpec(name=name, quantize=lambda w: {}, dequantize=lambda p: None)]

    return types.SimpleNamespace(heteroserve_linear_schemes=heteroserve_linear_schemes,
                                 HETEROSERVE_PLUGIN_API="1.0")


def test_a_taken_scheme_name_refuses_the_plugin() -> None:
    catalog = load_plugins([("thief", _scheme_plugin("int8_w8a8")), ("a", _scheme_plugin("s")),
                            ("b", _scheme_plugin("s"))], use_entry_points=False)
    errors = {f.plugin: f.error for f in catalog.failures}
    assert errors == {"thief": "ValueError: linear scheme 'int8_w8a8' is built in",
                      "b": "ValueError: linear scheme 's' is already defined by in-process"}
    assert set(catalog.linear_schemes) == {"s"}
