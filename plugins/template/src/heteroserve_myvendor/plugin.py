"""Hook implementations (see heteroserve/core/plugins/hookspecs.py for every hook)."""

from __future__ import annotations

from typing import Any

import torch

from heteroserve import hookimpl
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support

from heteroserve_myvendor.platform import MyVendorPlatform


@hookimpl
def heteroserve_platforms() -> list[MyVendorPlatform]:
    return [MyVendorPlatform()]


def _load_rms_norm() -> Any:
    from heteroserve_myvendor.kernels import rms_norm  # imports your vendor library lazily

    return rms_norm


def _supports_rms_norm(request: KernelRequest) -> Support:
    if request.dtype not in (torch.bfloat16, torch.float16):
        return Support.no("MyVendor rms_norm takes bf16/fp16 only")
    return Support.yes()


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    # Every op you do not register falls back to the torch-native implementation.
    registry.register(KernelSpec(
        op=ops.RMS_NORM, name="myvendor", load=_load_rms_norm, platforms=("myvendor",),
        priority=10, supports=_supports_rms_norm, description="MyVendor fused RMSNorm"))


@hookimpl
def heteroserve_conformance_options() -> dict[str, object]:
    return {"skip_ops": {}}
