"""Hook implementations (the hooks are documented in docs/plugin-authoring.md)."""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.plugin_api import (
    RMS_NORM, KernelRegistry, KernelRequest, KernelSpec, Support, hookimpl, torch_native,
)

from heteroserve_myvendor.platform import MyVendorPlatform, simulating

#: the plugin API version this plugin was built for (the loader refuses incompatible ones)
HETEROSERVE_PLUGIN_API = "1.0"


@hookimpl
def heteroserve_platforms() -> list[MyVendorPlatform]:
    return [MyVendorPlatform()]


def _load_rms_norm() -> Any:
    if simulating():  # no device yet: the torch-native kernel stands in for yours
        return torch_native(RMS_NORM)
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
        op=RMS_NORM, name="myvendor", load=_load_rms_norm, platforms=("myvendor",),
        priority=10, supports=_supports_rms_norm, description="MyVendor fused RMSNorm"))


@hookimpl
def heteroserve_conformance_options() -> dict[str, object]:
    return {"skip_ops": {}}
