"""``heteroserve bisect`` names the kernel at fault: a deliberately broken plugin's rms_norm
(0.1% too large) wins dispatch on cpu; bisect finds the first diverging call and, swapping one
op at a time to torch_native, names that kernel. A clean platform shows no divergence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from heteroserve.conformance.bisect import bisect, trace_prefill
from heteroserve.core.kernels.dispatch import wanted_ops
from heteroserve.core.models.tiny import build_tiny_model

BROKEN = '''"""A plugin whose rms_norm is 0.1% too large (tests/conformance/test_bisect.py)."""
from heteroserve.plugin_api import RMS_NORM, KernelSpec, hookimpl, torch_native

HETEROSERVE_PLUGIN_API = "1.0"


def scaled_rms_norm(x, weight, eps):
    return torch_native(RMS_NORM)(x, weight, eps) * 1.001


@hookimpl
def heteroserve_register_kernels(registry):
    registry.register(KernelSpec(op=RMS_NORM, name="scaled_rms_norm",
                                 load=lambda: scaled_rms_norm, platforms=("cpu",), priority=10))
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("bisect-llama"), "llama", seed=0))


def test_trace_covers_every_kernel_of_a_decoder_layer(model_dir: str) -> None:
    trace = trace_prefill(model_dir, "cpu", "float32", {op: "torch_native" for op in wanted_ops()})
    seen = {c.op for c in trace.calls}
    assert {"rms_norm", "fused_add_rms_norm", "rotary_embedding", "attention",
            "silu_and_mul", "linear.unquantized"} <= seen, seen
    assert {c.layer for c in trace.calls} >= {0, 1}


def test_clean_platform_has_no_divergence(model_dir: str) -> None:
    result = bisect(model_dir, "cpu", overrides={"attention": "torch_native"})
    assert result.divergence is None and not result.swaps


def test_broken_plugin_kernel_is_named(model_dir: str, tmp_path: Path) -> None:
    (tmp_path / "hs_bisect_broken.py").write_text(BROKEN)
    info = tmp_path / "hs_bisect_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hs-bisect-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[heteroserve.platforms]\nbroken = hs_bisect_broken\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", "from heteroserve.server.cli import main; raise SystemExit(main())",
         "bisect", "--platform", "cpu", "--model", model_dir],
        env=env, text=True, capture_output=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr[-2000:]
    assert "first divergence at call 0 (rms_norm, layer 0)" in out, out
    assert "--kernel rms_norm=torch_native: agrees with the reference" in out, out
    assert out.strip().splitlines()[-1] == "kernel at fault: rms_norm=scaled_rms_norm", out
