"""Entry point of the built-in ``cpu`` platform plugin.

Registers the CPU platform and the torch-native implementation of every op. Those
implementations run on any torch device (``platforms=("*",)``) at the lowest priority, so
they are the fallback wherever a vendor registers nothing for an op.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.linear import LINEAR_SCHEMES
from heteroserve.core.kernels.registry import (
    ANY_PLATFORM, KernelRegistry, KernelRequest, KernelSpec, Support,
)
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.cpu.platform import CpuPlatform

_PKG = "heteroserve.platforms.cpu"
FALLBACK_PRIORITY = -100


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


#: op -> (module, attribute) of the torch-native implementation.
TORCH_NATIVE: dict[str, tuple[str, str]] = {
    ops.ATTENTION: ("attention", "TorchNativeAttention"),
    ops.MLA_ATTENTION: ("mla", "TorchNativeMLA"),
    ops.RMS_NORM: ("norm", "rms_norm"),
    ops.FUSED_ADD_RMS_NORM: ("norm", "fused_add_rms_norm"),
    ops.NORM_ADD_NORM: ("norm", "norm_add_norm"),
    ops.SILU_AND_MUL: ("activation", "silu_and_mul"),
    ops.GELU_AND_MUL: ("activation", "gelu_and_mul"),
    ops.ROTARY: ("rotary", "apply_rotary"),
    ops.QK_NORM_ROTARY: ("qk_norm", "qk_norm_rotary"),
    ops.MOE_TOPK_SOFTMAX: ("moe", "topk_softmax"),
    ops.MOE_GROUPED_TOPK: ("moe", "grouped_topk"),
    ops.FUSED_MOE: ("moe", "fused_moe"),
    ops.SAMPLING: ("sampling", "sample"),
    ops.TOKEN_BITMASK_APPLY: ("bitmask", "apply_token_bitmask"),
    **{ops.linear_op(s): ("linear", f"{''.join(p.title() for p in s.split('_'))}Linear")
       for s in LINEAR_SCHEMES},
}


@hookimpl
def heteroserve_platforms() -> list[CpuPlatform]:
    return [CpuPlatform()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for op, (module, attr) in TORCH_NATIVE.items():
        registry.register(KernelSpec(
            op=op, name="torch_native", load=_lazy(module, attr), platforms=(ANY_PLATFORM,),
            priority=FALLBACK_PRIORITY, native_on=("cpu",),
            kv_cache_dtypes=("auto", "fp8_e4m3") if op == ops.ATTENTION else ("auto",),
            description="torch-native reference implementation; runs on any torch device"))
    registry.register(KernelSpec(
        op=ops.linear_op("unquantized"), name="onednn_prepacked",
        load=_lazy("linear", "OneDNNPrepackedLinear"), platforms=("cpu",),
        priority=FALLBACK_PRIORITY + 10, supports=_supports_prepacked,
        description="weights reordered once at load into oneDNN's blocked layout"))


def _supports_prepacked(request: KernelRequest) -> Support:
    from heteroserve.platforms.cpu.linear import supports_prepacked

    return supports_prepacked(request)
