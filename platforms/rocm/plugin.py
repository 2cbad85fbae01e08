"""Entry point of the built-in ``rocm`` platform plugin (AMD GPUs, aiter, RCCL).

Registers :class:`RocmPlatform`, the aiter implementations (each spec's ``supports`` says "aiter
is not installed" where it is absent; ``load`` imports aiter only when selected) and, for every
op, the shared Triton kernels of ``heteroserve.platforms.triton`` when that package is present.
Whatever neither covers runs on the torch-native implementations.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.rocm.attention import AITER_HEAD_SIZES, AITER_PAGE_SIZES
from heteroserve.platforms.rocm.platform import RocmPlatform, aiter_missing

logger = logging.getLogger(__name__)

AITER_PRIORITY = 50
TRITON_PRIORITY = 0
_PKG = "heteroserve.platforms.rocm"
_HALF = (torch.float16, torch.bfloat16)


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


def _needs_aiter(extra: Callable[[KernelRequest], Support] | None = None,
                 dtypes: tuple[torch.dtype, ...] | None = None
                 ) -> Callable[[KernelRequest], Support]:
    def supports(request: KernelRequest) -> Support:
        missing = aiter_missing()
        if missing:
            return Support.no(missing)
        if dtypes is not None and request.dtype not in dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            return Support.no(f"{str(request.dtype).removeprefix('torch.')} not supported "
                              f"(aiter takes {names})")
        return extra(request) if extra else Support.yes()

    return supports


def _attention_limits(request: KernelRequest) -> Support:
    if request.head_size is not None and request.head_size not in AITER_HEAD_SIZES:
        return Support.no(f"head size {request.head_size} not in {list(AITER_HEAD_SIZES)} "
                          "(aiter paged_attention_ragged)")
    if request.sliding_window:
        return Support.no("aiter paged_attention_ragged has no sliding window")
    return Support.yes()


_AITER_KERNELS: tuple[tuple[str, str, str, str, tuple[torch.dtype, ...] | None,
                            Callable[[KernelRequest], Support] | None], ...] = (
    (ops.ATTENTION, "aiter_paged", "attention", "AiterPagedAttention", _HALF, _attention_limits),
    (ops.RMS_NORM, "aiter_rms_norm", "kernels", "rms_norm", _HALF, None),
    (ops.FUSED_ADD_RMS_NORM, "aiter_rmsnorm2d_fwd_with_add", "kernels", "fused_add_rms_norm",
     _HALF, None),
    (ops.SILU_AND_MUL, "aiter_silu_and_mul", "kernels", "silu_and_mul", _HALF, None),
    (ops.ROTARY, "aiter_rotary_embedding_fwd", "kernels", "apply_rotary", _HALF, None),
    (ops.MOE_TOPK_SOFTMAX, "aiter_topk_softmax", "kernels", "topk_softmax", None, None),
    (ops.FUSED_MOE, "aiter_fused_moe", "kernels", "fused_moe", _HALF, None),
    (ops.linear_op("int8_w8a8"), "aiter_gemm_a8w8", "linear", "AiterInt8W8A8Linear", _HALF,
     None),
    (ops.linear_op("fp8_per_tensor"), "aiter_gemm_a8w8_fp8", "linear",
     "AiterFp8PerTensorLinear", _HALF, None),
)


def aiter_kernel_specs(platform: str = "rocm") -> list[KernelSpec]:
    """The aiter implementations, registered for ``platform`` (the test doubles register the
    same specs for their CPU-backed stand-in platform)."""
    return [
        KernelSpec(op=op, name=name if platform == "rocm" else f"{name}@{platform}",
                   load=_lazy(module, attr), platforms=(platform,), priority=AITER_PRIORITY,
                   supports=_needs_aiter(extra, dtypes), native_on=(platform,),
                   description=f"aiter: {module}.{attr}",
                   page_sizes=AITER_PAGE_SIZES if op == ops.ATTENTION else None)
        for op, name, module, attr, dtypes, extra in _AITER_KERNELS
    ]


def triton_specs_for_rocm() -> list[KernelSpec]:
    """The shared Triton kernels registered for ``rocm`` (named ``triton`` as on cuda), or ``[]``
    when ``heteroserve.platforms.triton`` is not part of this installation."""
    try:
        registration = importlib.import_module("heteroserve.platforms.triton.registration")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("heteroserve.platforms.triton"):
            logger.info("rocm: shared Triton kernels not installed; aiter and torch-native only")
            return []
        raise
    return registration.triton_kernel_specs(
        platforms=("rocm",), priority=TRITON_PRIORITY, native_on=("rocm",))


@hookimpl
def heteroserve_platforms() -> list[RocmPlatform]:
    return [RocmPlatform()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for spec in (*aiter_kernel_specs(), *triton_specs_for_rocm()):
        registry.register(spec)
