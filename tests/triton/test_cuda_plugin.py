"""The cuda plugin: loads here (no GPU, maybe no flashinfer), reports why cuda is
unavailable, registers Triton and flashinfer kernels that explain themselves, and importing
heteroserve or loading plugins imports neither triton nor flashinfer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.dispatch import resolve_all
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest
from heteroserve.core.plugins.manager import load_plugins
from heteroserve.platforms.cuda import plugin


def _registry() -> KernelRegistry:
    registry = KernelRegistry()
    plugin.heteroserve_register_kernels(registry)
    return registry


def test_loading_imports_no_triton_or_flashinfer() -> None:
    code = (
        "import sys, heteroserve\n"
        "from heteroserve.core.plugins.manager import load_plugins\n"
        "from heteroserve.core.kernels.registry import KernelRequest\n"
        "import torch\n"
        "c = load_plugins()\n"
        "assert 'cuda' in c.platforms, c.failures\n"
        "c.platforms['cuda'].availability\n"
        "req = KernelRequest('cuda', 'cuda', torch.bfloat16, 128, 8, 8, 16)\n"
        "[s.check(req) for op in c.registry.ops() for s in c.registry.implementations(op)]\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('triton', 'flashinfer'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout}"


def test_platform_reports_availability() -> None:
    catalog = load_plugins()
    assert not [f for f in catalog.failures if f.plugin == "cuda"], catalog.failures
    entry = catalog.platforms["cuda"]
    availability = entry.availability
    if torch.cuda.is_available() and torch.version.hip is None:
        assert availability.available and availability.devices
    else:
        assert not availability.available
        assert availability.reason.startswith(("torch was built without CUDA",
                                               "no CUDA device visible", "torch is a ROCm"))
    caps = entry.platform.capabilities()
    assert caps.distributed_backend == "nccl" and caps.graph_capture
    assert caps.dtypes[-1] == torch.float32


def test_triton_kernels_registered_for_cuda_and_forceable() -> None:
    registry = _registry()
    triton_ops = {s.op for op in registry.ops() for s in registry.implementations(op)
                  if s.name == "triton"}
    assert {ops.ATTENTION, ops.FUSED_MOE, ops.SAMPLING, ops.linear_op("awq_w4a16")} <= triton_ops
    request = KernelRequest("cuda", "cuda", torch.bfloat16, 128, 32, 8, 16)
    full = load_plugins().registry  # with the torch-native fallback for the other ops
    resolutions = resolve_all(full, request, {ops.ATTENTION: "triton"})
    assert resolutions[ops.ATTENTION].chosen.name == "triton"
    assert resolutions[ops.ATTENTION].forced


def test_supports_explain_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    from heteroserve.platforms.triton import registration

    specs = {s.op: s for s in registration.triton_kernel_specs(("cuda",), 10, ("cuda",))}
    good = KernelRequest("cuda", "cuda", torch.float16, 128, 8, 2, 16)
    assert specs[ops.ATTENTION].check(good).ok
    assert "head size 512" in specs[ops.ATTENTION].check(
        KernelRequest("cuda", "cuda", torch.float16, 512, 8, 2)).reason
    assert "not a multiple" in specs[ops.ATTENTION].check(
        KernelRequest("cuda", "cuda", torch.float16, 128, 6, 4)).reason
    assert "dtype" in specs[ops.RMS_NORM].check(
        KernelRequest("cuda", "cuda", torch.float64)).reason
    assert "runs only on cuda" in specs[ops.RMS_NORM].check(
        KernelRequest("cpu", "cpu", torch.float16)).reason
    assert "no backend" in specs[ops.RMS_NORM].supports(
        KernelRequest("npu", "npu", torch.float16)).reason
    monkeypatch.setattr(registration, "triton_missing", lambda: "triton is not installed (x)")
    assert specs[ops.RMS_NORM].check(good).reason == "triton is not installed (x)"


def test_flashinfer_supports_says_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    specs = {s.op: s for s in plugin.flashinfer_kernel_specs()}
    monkeypatch.setattr(plugin, "flashinfer_missing", lambda: "flashinfer not installed (x)")
    request = KernelRequest("cuda", "cuda", torch.bfloat16, 128, 32, 8, 16)
    for op in (ops.ATTENTION, ops.RMS_NORM, ops.FUSED_ADD_RMS_NORM):
        assert specs[op].check(request).reason == "flashinfer not installed (x)"
    monkeypatch.setattr(plugin, "flashinfer_missing", lambda: None)
    assert specs[ops.ATTENTION].check(request).ok
    assert "bf16/fp16" in specs[ops.ATTENTION].check(
        KernelRequest("cuda", "cuda", torch.float32, 128, 32, 8)).reason
    assert "head size 96" in specs[ops.ATTENTION].check(
        KernelRequest("cuda", "cuda", torch.float16, 96, 32, 8)).reason
