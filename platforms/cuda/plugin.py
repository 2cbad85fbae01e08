"""Entry point of the built-in ``cuda`` platform plugin.

Registers the CUDA platform, the shared Triton kernels for ``cuda`` (name ``triton``, above
the torch-native fallback) and flashinfer adapters (name ``flashinfer``, below Triton and
selected with ``--kernel OP=flashinfer``) whose ``supports`` says "flashinfer not installed"
when it is absent. Loading this plugin imports neither triton nor flashinfer.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.cuda.platform import CudaPlatform
from heteroserve.platforms.triton.registration import triton_kernel_specs

PLATFORMS = ("cuda",)
TRITON_PRIORITY = 10
#: below Triton: flashinfer's plans are host state that a captured decode graph cannot replay
#: (graph_safe False), and batch-1 decode lives on graphs; --kernel attention=flashinfer selects it
FLASHINFER_PRIORITY = 8
#: flashinfer's norms were not measured on a GPU yet (the Triton ones run at 80-90% of the
#: copy ceiling), so they stay selectable (--kernel rms_norm=flashinfer) but below Triton
FLASHINFER_NORM_PRIORITY = 5
_PKG = "heteroserve.platforms.cuda"


def flashinfer_missing() -> str | None:
    """Why flashinfer cannot be used, or None (imports nothing)."""
    try:
        found = importlib.util.find_spec("flashinfer") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "flashinfer not installed (pip install flashinfer-python)"


def _flashinfer_common(request: KernelRequest) -> Support:
    why = flashinfer_missing()
    if why:
        return Support.no(why)
    if request.device_type != "cuda":
        return Support.no(f"flashinfer runs on CUDA devices, not {request.device_type!r}")
    if request.dtype not in (torch.bfloat16, torch.float16):
        return Support.no(f"flashinfer kernels take bf16/fp16, not {request.dtype}")
    return Support.yes()


def _flashinfer_attention(request: KernelRequest) -> Support:
    base = _flashinfer_common(request)
    if not base:
        return base
    from heteroserve.platforms.cuda.flashinfer_attention import HEAD_SIZES  # torch only

    if request.head_size is not None and request.head_size not in HEAD_SIZES:
        return Support.no(f"head size {request.head_size} not in {list(HEAD_SIZES)}")
    return Support.yes()


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


def flashinfer_kernel_specs() -> list[KernelSpec]:
    """The flashinfer adapters for ``cuda`` (attention, RMSNorm, fused add+RMSNorm)."""
    table = [
        (ops.ATTENTION, "flashinfer_attention", "FlashInferAttention", _flashinfer_attention,
         FLASHINFER_PRIORITY, "flashinfer BatchPrefill/BatchDecode paged wrappers, NHD"),
        (ops.RMS_NORM, "flashinfer_norm", "rms_norm", _flashinfer_common,
         FLASHINFER_NORM_PRIORITY, "flashinfer rmsnorm"),
        (ops.FUSED_ADD_RMS_NORM, "flashinfer_norm", "fused_add_rms_norm", _flashinfer_common,
         FLASHINFER_NORM_PRIORITY, "flashinfer fused_add_rmsnorm, in place"),
    ]
    return [KernelSpec(op=op, name="flashinfer", load=_lazy(module, attr), platforms=PLATFORMS,
                       priority=priority, supports=supports, native_on=PLATFORMS,
                       description=what)
            for op, module, attr, supports, priority, what in table]


@hookimpl
def heteroserve_platforms() -> list[CudaPlatform]:
    return [CudaPlatform()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for spec in (*triton_kernel_specs(PLATFORMS, TRITON_PRIORITY, PLATFORMS),
                 *flashinfer_kernel_specs()):
        registry.register(spec)
