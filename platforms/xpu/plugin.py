"""Entry point of the built-in ``xpu`` platform plugin (Intel GPUs).

Registers :class:`XpuPlatform` and the IPEX implementations below. IPEX is optional (its
development ended after 2.8 and each release pins one torch version), so every op also stands on
``torch.xpu`` alone: the torch-native implementations run on the ``xpu`` device. Each spec's
``supports`` says "intel-extension-for-pytorch is not installed" where it is absent; nothing
here imports IPEX.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.xpu.platform import XpuPlatform, ipex_missing

IPEX_PRIORITY = 50
_PKG = "heteroserve.platforms.xpu"
_HALF = (torch.float16, torch.bfloat16)


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


def _needs_ipex(extra: Callable[[KernelRequest], Support] | None = None,
                dtypes: tuple[torch.dtype, ...] | None = None
                ) -> Callable[[KernelRequest], Support]:
    def supports(request: KernelRequest) -> Support:
        missing = ipex_missing()
        if missing:
            return Support.no(missing)
        if dtypes is not None and request.dtype not in dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            return Support.no(f"{str(request.dtype).removeprefix('torch.')} not supported "
                              f"(IPEX takes {names})")
        return extra(request) if extra else Support.yes()

    return supports


def _attention_limits(request: KernelRequest) -> Support:
    if request.sliding_window:
        return Support.no("IPEX PagedAttention has no sliding window")
    if request.logit_cap:
        return Support.no("IPEX PagedAttention has no logit soft-capping")
    return Support.yes()


_IPEX_KERNELS: tuple[tuple[str, str, str, str, tuple[torch.dtype, ...] | None,
                           Callable[[KernelRequest], Support] | None], ...] = (
    (ops.ATTENTION, "ipex_paged", "attention", "IpexPagedAttention", _HALF, _attention_limits),
    (ops.RMS_NORM, "ipex_rms_norm", "kernels", "rms_norm", None, None),
    (ops.FUSED_ADD_RMS_NORM, "ipex_add_rms_norm", "kernels", "fused_add_rms_norm", None, None),
    (ops.SILU_AND_MUL, "ipex_silu_mul", "kernels", "silu_and_mul", None, None),
    (ops.GELU_AND_MUL, "ipex_gelu_mul", "kernels", "gelu_and_mul", None, None),
    (ops.ROTARY, "ipex_rotary_embedding", "kernels", "apply_rotary", None, None),
)


def ipex_kernel_specs(platform: str = "xpu") -> list[KernelSpec]:
    """The IPEX implementations, registered for ``platform`` (the test doubles register the
    same specs for their CPU-backed stand-in platform)."""
    return [
        KernelSpec(op=op, name=name if platform == "xpu" else f"{name}@{platform}",
                   load=_lazy(module, attr), platforms=(platform,), priority=IPEX_PRIORITY,
                   supports=_needs_ipex(extra, dtypes), native_on=(platform,),
                   description=f"intel-extension-for-pytorch: {module}.{attr}")
        for op, name, module, attr, dtypes, extra in _IPEX_KERNELS
    ]


@hookimpl
def heteroserve_platforms() -> list[XpuPlatform]:
    return [XpuPlatform()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for spec in ipex_kernel_specs():
        registry.register(spec)
