"""Entry point of the built-in ``npu`` platform plugin (Ascend, torch_npu).

Registers :class:`NpuPlatform` and the torch_npu implementations below. Nothing here imports
torch_npu: each spec's ``supports`` says "torch_npu is not installed" when it is absent, and
``load`` imports the kernel module (which imports torch_npu) only when selected. Ops without a
torch_npu implementation here (GELU-and-mul, grouped top-k routing, the token bitmask, which
xgrammar has no NPU kernel for, fp8 and unquantized linears) use the torch-native
implementations, which run on the ``npu`` device as they are.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.npu.platform import NPU_PAGE_SIZE, NpuPlatform, npu_module_missing

NATIVE_PRIORITY = 50
_PKG = "heteroserve.platforms.npu"
_HALF = (torch.float16, torch.bfloat16)


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


def _needs_vendor(extra: Callable[[KernelRequest], Support] | None = None,
                  dtypes: tuple[torch.dtype, ...] | None = None
                  ) -> Callable[[KernelRequest], Support]:
    def supports(request: KernelRequest) -> Support:
        missing = npu_module_missing()
        if missing:
            return Support.no(missing)
        if dtypes is not None and request.dtype not in dtypes:
            names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            return Support.no(f"{str(request.dtype).removeprefix('torch.')} not supported "
                              f"(torch_npu takes {names})")
        return extra(request) if extra else Support.yes()

    return supports


def _attention_limits(request: KernelRequest) -> Support:
    if request.head_size is not None and request.head_size > 256:
        return Support.no(f"head size {request.head_size} > 256")
    if request.sliding_window:
        return Support.no("sliding window not wired to npu_fused_infer_attention_score")
    if request.logit_cap:
        return Support.no("npu_fused_infer_attention_score has no logit soft-capping")
    return Support.yes()


#: (op, implementation name, module, attribute, supported dtypes or None, extra check)
_NPU_KERNELS: tuple[tuple[str, str, str, str, tuple[torch.dtype, ...] | None,
                          Callable[[KernelRequest], Support] | None], ...] = (
    (ops.ATTENTION, "npu_fia", "attention", "NpuFusedInferAttention", _HALF, _attention_limits),
    (ops.RMS_NORM, "npu_rms_norm", "kernels", "rms_norm", None, None),
    (ops.FUSED_ADD_RMS_NORM, "npu_add_rms_norm", "kernels", "fused_add_rms_norm", None, None),
    (ops.SILU_AND_MUL, "npu_swiglu", "kernels", "silu_and_mul", None, None),
    (ops.ROTARY, "npu_rotary_mul", "kernels", "apply_rotary", None, None),
    (ops.MOE_TOPK_SOFTMAX, "npu_moe_gating_top_k_softmax", "kernels", "topk_softmax", None,
     None),
    (ops.FUSED_MOE, "npu_grouped_matmul", "kernels", "fused_moe", None, None),
    (ops.SAMPLING, "npu_top_k_top_p", "sampling", "sample", None, None),
    (ops.linear_op("int8_w8a8"), "npu_quant_matmul", "linear", "NpuInt8W8A8Linear", _HALF,
     None),
    (ops.linear_op("awq_w4a16"), "npu_weight_quant_batchmatmul_awq", "linear",
     "NpuAwqW4A16Linear", _HALF, None),
    (ops.linear_op("gptq_w4a16"), "npu_weight_quant_batchmatmul_gptq", "linear",
     "NpuGptqW4A16Linear", _HALF, None),
)


def npu_kernel_specs(platform: str = "npu") -> list[KernelSpec]:
    """The torch_npu implementations, registered for ``platform`` (the test doubles register
    the very same specs for their CPU-backed stand-in platform)."""
    specs = []
    for op, name, module, attr, dtypes, extra in _NPU_KERNELS:
        specs.append(KernelSpec(
            op=op, name=name if platform == "npu" else f"{name}@{platform}",
            load=_lazy(module, attr), platforms=(platform,), priority=NATIVE_PRIORITY,
            supports=_needs_vendor(extra, dtypes), native_on=(platform,), provider="",
            description=f"torch_npu: {module}.{attr}",
            page_sizes=(NPU_PAGE_SIZE,) if op == ops.ATTENTION else None))
    return specs


@hookimpl
def heteroserve_platforms() -> list[NpuPlatform]:
    return [NpuPlatform()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for spec in npu_kernel_specs():
        registry.register(spec)
