"""The example plugin's ``example-int8-wo`` format, for tests: its catalog (loaded from this
checkout), an environment in which a subprocess discovers it, and tiny checkpoints written
in the format with their dequantized transformers reference."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from heteroserve.core.plugins.manager import PluginCatalog, load_plugins

EXAMPLE_SRC = Path(__file__).resolve().parents[2] / "plugins/example/src"
IGNORE = ["re:.*layers\\.1\\.mlp\\.down_proj"]
QCFG = {"quant_method": "example-int8-wo", "bits": 8, "ignore": IGNORE}


def _installed() -> bool:
    return any(ep.name == "example_splitkv"
               for ep in md.entry_points(group="heteroserve.platforms"))


def example_catalog(monkeypatch: pytest.MonkeyPatch) -> PluginCatalog:
    """Every installed plugin plus the example plugin from this checkout (through its entry
    point where it is installed)."""
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    plugin = importlib.import_module("heteroserve_example_splitkv.plugin")
    catalog = load_plugins() if _installed() else load_plugins([("example_splitkv", plugin)])
    assert "example-int8-wo" in catalog.quant_formats, catalog.failures
    return catalog


def example_plugin_env(tmp_path: Path) -> dict[str, str]:
    """``os.environ`` with the example plugin importable and, where it is not installed, its
    entry point declared by a stub distribution under ``tmp_path``, so that a subprocess
    discovers it as an installed plugin."""
    env = dict(os.environ)
    paths = [str(EXAMPLE_SRC)]
    if not _installed():
        info = tmp_path / "site/heteroserve_example_splitkv-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\n"
                                       "Name: heteroserve-example-splitkv\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(
            "[heteroserve.platforms]\nexample_splitkv = heteroserve_example_splitkv.plugin\n")
        paths.append(str(info.parent))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*paths, env.get("PYTHONPATH")]))
    return env


def write_int8wo(src: Path, out: Path) -> Path:
    """``src`` (fp32) with every projection (``*_proj.weight``, MoE experts' included) but
    the ignored one quantized to int8 per output channel (``scales = amax / 127``), in the
    example plugin's format."""
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, t in load_file(f).items():
            module = name.removesuffix(".weight")
            quantize = (name.endswith("_proj.weight") and t.dim() == 2
                        and not re.fullmatch(IGNORE[0][3:], module))
            if not quantize:
                tensors[name] = t
                continue
            w = t.to(torch.float64)
            scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            tensors[f"{module}.qweight"] = torch.round(w / scales[:, None]).clamp(
                -127, 127).to(torch.int8)
            tensors[f"{module}.scales"] = scales.to(torch.float32)
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = QCFG
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def dequantized_int8wo(ckpt: Path, out: Path) -> transformers.PreTrainedModel:
    """transformers on ``W = qweight * scales`` (fp32), the reference."""
    out.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    src = load_file(ckpt / "model.safetensors")
    dense = {k: v for k, v in src.items() if not k.endswith((".qweight", ".scales"))}
    for k, q in src.items():
        if k.endswith(".qweight"):
            module = k.removesuffix(".qweight")
            dense[f"{module}.weight"] = (q.to(torch.float64) * src[f"{module}.scales"].to(
                torch.float64)[:, None]).to(torch.float32)
    save_file(dense, str(out / "model.safetensors"))
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
