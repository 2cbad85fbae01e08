"""Every torch-native registration of the CPU plugin loads, and the CPU dispatch resolves."""

from __future__ import annotations

import importlib

import torch

from heteroserve.core.kernels.attention import AttentionBackend
from heteroserve.core.kernels.dispatch import resolve_dispatch
from heteroserve.core.kernels.linear import LINEAR_SCHEMES, LinearMethod
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest
from heteroserve.platforms.cpu import plugin


def test_every_registered_attribute_exists() -> None:
    for op, (module, attr) in plugin.TORCH_NATIVE.items():
        impl = getattr(importlib.import_module(f"heteroserve.platforms.cpu.{module}"), attr)
        if op == "attention":
            assert issubclass(impl, AttentionBackend) and impl.page_sizes is None
        elif op.startswith("linear."):
            assert issubclass(impl, LinearMethod) and impl.scheme == op.split(".", 1)[1]
        else:
            assert callable(impl) and impl.__doc__


def test_cpu_dispatch_table_resolves_to_torch_native() -> None:
    registry = KernelRegistry()
    plugin.heteroserve_register_kernels(registry)
    table = resolve_dispatch(registry, KernelRequest("cpu", "cpu", torch.bfloat16, page_size=16),
                             linear_schemes=LINEAR_SCHEMES)
    assert all(kind == "native" for _, _, kind in table.summary())
    x = torch.randn(3, 8)
    torch.testing.assert_close(table.rms_norm(x, torch.ones(8), 1e-6),
                               x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
