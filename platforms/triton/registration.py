"""KernelSpecs for this package's Triton kernels, for any platform plugin to register.

The cuda, rocm and xpu plugins call :func:`triton_kernel_specs` with their own platform name
and priority. Nothing here imports triton or a kernel module: each spec's ``load`` imports
its module on selection, and each ``supports`` answers from ``importlib.util.find_spec``,
the request and (for fp8) the device's compute capability.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRequest, KernelSpec, Support
from heteroserve.platforms.triton.support import device_unsupported, triton_missing

_PKG = "heteroserve.platforms.triton"
NAME = "triton"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_HEAD, MAX_HEAD = 16, 256
#: KV cache dtypes of the attention kernels (fp8: stored saturated, read back unscaled)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")

#: op -> (module, attribute, what it is)
TRITON_KERNELS: dict[str, tuple[str, str, str]] = {
    ops.ATTENTION: ("attention", "TritonAttention",
                    "paged NHD attention: flash-style extend, split-KV decode, any page size"),
    ops.MLA_ATTENTION: ("mla", "TritonMLA",
                        "latent attention: split-KV absorbed decode (graph-safe), torch extend"),
    ops.RMS_NORM: ("norm", "rms_norm", "one-pass RMSNorm, row in registers"),
    ops.FUSED_ADD_RMS_NORM: ("norm", "fused_add_rms_norm", "residual add + RMSNorm, in place"),
    ops.NORM_ADD_NORM: ("norm", "norm_add_norm",
                        "RMSNorm, residual add, RMSNorm: one launch, in place"),
    ops.SILU_AND_MUL: ("activation", "silu_and_mul", "gated SiLU"),
    ops.GELU_AND_MUL: ("activation", "gelu_and_mul", "gated GELU (erf or tanh)"),
    ops.ROTARY: ("rotary", "apply_rotary", "rotary embedding in place (NeoX and GPT-J)"),
    ops.QK_NORM_ROTARY: ("qk_norm", "qk_norm_rotary",
                         "per-head q/k RMSNorm + rotary in place, one launch"),
    ops.MOE_TOPK_SOFTMAX: ("moe", "topk_softmax", "softmax + top-k routing, one row a program"),
    ops.MOE_GROUPED_TOPK: ("moe_routing", "grouped_topk",
                           "DeepSeek grouped top-k (softmax or sigmoid + bias), one row a "
                           "program"),
    ops.FUSED_MOE: ("moe", "fused_moe",
                    "GEMV pair kernels up to 64 pairs, else grouped GEMM over expert-sorted "
                    "pairs (tiles from moe_tuned/<device>.json where the expert shape is "
                    "tuned, else a heuristic)"),
    ops.SAMPLING: ("sampling", "sample",
                   "sorted-threshold filters + counter-noise Gumbel-max draw on device"),
    ops.TOKEN_BITMASK_APPLY: ("bitmask", "apply_token_bitmask", "grammar bitmask, in place"),
    ops.linear_op("unquantized"): ("linear_float", "UnquantizedLinear",
                                   "Triton GEMV for one row, torch F.linear for more"),
    ops.linear_op("fp8_per_tensor"): ("linear_w8a8", "Fp8PerTensorLinear",
                                      "fp8 GEMV (x quantized in-kernel) for <= 4 rows, "
                                      "torch._scaled_mm / Triton GEMM for more"),
    ops.linear_op("fp8_per_channel"): ("linear_w8a8", "Fp8PerChannelLinear",
                                       "fp8 GEMV (x quantized in-kernel) for <= 4 rows, "
                                       "fp8 GEMM, per-token x per-channel scales"),
    ops.linear_op("fp8_block"): ("linear_w8a8", "Fp8BlockLinear",
                                 "fp8 GEMV (x quantized per 128 in-kernel) for <= 4 "
                                 "rows, 128x128 block-scaled fp8 GEMM for more"),
    ops.linear_op("int8_w8a8"): ("linear_w8a8", "Int8W8A8Linear",
                                 "int8 GEMV (x quantized in-kernel) for <= 4 rows, "
                                 "int8 GEMM (int32 accumulation) for more"),
    ops.linear_op("awq_w4a16"): ("linear_w4a16", "AwqW4A16Linear",
                                 "4-bit GEMV for <= 4 rows (kernel and tiles per shape "
                                 "from w4_gemv_tuned/<device>.json), dequant-GEMM to 127, "
                                 "dequantize + BLAS GEMM from 128"),
    ops.linear_op("gptq_w4a16"): ("linear_w4a16", "GptqW4A16Linear",
                                  "4-bit GEMV for <= 4 rows (kernel and tiles per shape "
                                  "from w4_gemv_tuned/<device>.json), dequant-GEMM to 127, "
                                  "dequantize + BLAS GEMM from 128 (act-order by row "
                                  "permutation)"),
}


#: op -> (name, module, attribute, what it is): alternatives registered one priority below
TRITON_VARIANTS: dict[str, tuple[str, str, str, str]] = {
    ops.linear_op("unquantized"): ("triton_fused", "linear_float",
                                   "PrologueFusedUnquantizedLinear",
                                   "Triton GEMV with RMSNorm / SiLU-and-mul folded in, one row"),
}


def _lazy(module: str, attr: str) -> Callable[[], Any]:
    def load() -> Any:
        return getattr(importlib.import_module(f"{_PKG}.{module}"), attr)

    return load


def _base(request: KernelRequest) -> Support:
    why = triton_missing() or device_unsupported(request.device_type)
    if why:
        return Support.no(why)
    if request.dtype not in DTYPES:
        return Support.no(f"dtype {request.dtype} not supported (bf16, fp16, fp32)")
    return Support.yes()


def attention_supports(request: KernelRequest) -> Support:
    """What :class:`TritonAttention` (and backends built on it) serve: head size, GQA ratio,
    fp8 KV caches on capable devices; never raises."""
    base = _base(request)
    if not base:
        return base
    d = request.head_size
    if d is not None and not MIN_HEAD <= d <= MAX_HEAD:
        return Support.no(f"head size {d} not in {MIN_HEAD}..{MAX_HEAD}")
    hq, hk = request.num_q_heads, request.num_kv_heads
    if hq is not None and hk is not None and (hk <= 0 or hq % hk):
        return Support.no(f"{hq} query heads are not a multiple of {hk} KV heads")
    if request.kv_cache_dtype == "fp8_e4m3" and request.device_type != "cpu":
        cap = _nvidia_capability() if request.device_type == "cuda" else None
        if cap is None or cap < (8, 9):
            return Support.no("an fp8_e4m3 KV cache needs e4m3fn conversions: an NVIDIA GPU of "
                              "compute capability 8.9+ (found "
                              f"{'none' if cap is None else '%d.%d' % cap})")
    return Support.yes()


def _nvidia_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability on an NVIDIA build, else None."""
    if torch.version.hip is not None or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def fp8_supports(request: KernelRequest) -> Support:
    """What the Triton fp8 linears need: Triton on the device, a supported dtype, and fp8
    matrix units (an NVIDIA GPU of compute capability 8.9+); never raises."""
    base = _base(request)
    if not base:
        return base
    cap = _nvidia_capability() if request.device_type == "cuda" else None
    if cap is None or cap < (8, 9):
        return Support.no("fp8 e4m3fn matrix units need an NVIDIA GPU of compute capability "
                          f"8.9+ (found {'none' if cap is None else '%d.%d' % cap})")
    return Support.yes()


def _int8(request: KernelRequest) -> Support:
    base = _base(request)
    if not base:
        return base
    if request.device_type != "cuda":
        return Support.no("int8 tensor-core GEMM is enabled on CUDA/HIP devices only")
    return Support.yes()


_SUPPORTS: dict[str, Callable[[KernelRequest], Support]] = {
    ops.ATTENTION: attention_supports,
    ops.linear_op("fp8_per_tensor"): fp8_supports,
    ops.linear_op("fp8_per_channel"): fp8_supports,
    ops.linear_op("fp8_block"): fp8_supports,
    ops.linear_op("int8_w8a8"): _int8,
}


def triton_kernel_specs(platforms: tuple[str, ...], priority: int,
                        native_on: tuple[str, ...]) -> list[KernelSpec]:
    """One :class:`KernelSpec` named ``"triton"`` per op in :data:`TRITON_KERNELS`, for
    ``platforms`` at ``priority``, and the :data:`TRITON_VARIANTS` at ``priority - 1``;
    imports nothing."""
    return [
        KernelSpec(op=op, name=NAME, load=_lazy(module, attr), platforms=platforms,
                   priority=priority, supports=_SUPPORTS.get(op, _base), native_on=native_on,
                   description=f"Triton: {what}",
                   kv_cache_dtypes=KV_CACHE_DTYPES if op == ops.ATTENTION else ("auto",))
        for op, (module, attr, what) in TRITON_KERNELS.items()
    ] + [
        KernelSpec(op=op, name=name, load=_lazy(module, attr), platforms=platforms,
                   priority=priority - 1, supports=_SUPPORTS.get(op, _base),
                   native_on=native_on, description=f"Triton: {what}")
        for op, (name, module, attr, what) in TRITON_VARIANTS.items()
    ]
