"""W8A8 linear methods: fp8 per-tensor, fp8 per-channel, fp8 128x128 block, int8 per-channel (contract and
checkpoint layouts: ``core/kernels/linear.py``).

Up to :data:`~.w8_gemv.W8_GEMV_MAX_ROWS` rows (the decode step) go through
:func:`~.w8_gemv.w8_gemv`, one launch that quantizes the activation in registers with the same
rule and streams the 1-byte weight at the copy ceiling. Larger inputs: activations are
quantized dynamically by :func:`~.quant.quantize_rows` (per tensor, per token and 128-column
group, per token). fp8 per-tensor runs on ``torch._scaled_mm``
(cuBLASLt) for large 16-bit batches when the shape allows it (K and N multiples of 16 on a
CUDA device); everything else runs on :func:`~.scaled_gemm.scaled_gemm`. fp8 products are always accumulated in fp32
per 128-column tile, so long K loses no precision to fast fp8 accumulation.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import FP8_BLOCK, LinearMethod
from heteroserve.platforms.triton.linear_params import get_param, rows, set_param
from heteroserve.platforms.triton.quant import MIN_SCALE, quantize_rows
from heteroserve.platforms.triton.scaled_gemm import scaled_gemm
from heteroserve.platforms.triton.w8_gemv import (
    ACT_GROUP, ACT_ROW, ACT_TENSOR, W8_GEMV_MAX_ROWS, WS_BLOCK, WS_CHANNEL, WS_TENSOR, w8_gemv,
)

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _fp8_max(dtype: torch.dtype) -> float:
    if dtype not in _FP8_DTYPES:
        raise ValueError(f"fp8 linear: weight dtype {dtype} is not an fp8 e4m3 type")
    return float(torch.finfo(dtype).max)


def _finish(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.reshape(*x.shape[:-1], y.shape[-1])


#: below this many rows the Triton GEMM (fused per-tile scaling) beat cuBLASLt's fp8 GEMM
#: on an H100 (cuBLASLt: 0.38 ms at 256 x 4096 x 14336, Triton 0.16 ms; 0.44 vs 0.77 ms at 4096)
SCALED_MM_MIN_ROWS = 1024


def _scaled_mm_ok(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """cuBLASLt fp8 for large 16-bit batches whose K and N are multiples of 16; fp32
    outputs stay on the Triton GEMM, whose 16-row tiles accumulate exactly."""
    n, k = weight.shape
    return (x2.device.type == "cuda" and torch.version.hip is None and k % 16 == 0
            and n % 16 == 0 and hasattr(torch, "_scaled_mm")
            and x2.shape[0] > SCALED_MM_MIN_ROWS and x2.dtype != torch.float32)


class Fp8PerTensorLinear(LinearMethod):
    """W8A8 fp8: ``weight [N, K]`` fp8, ``weight_scale [1]`` fp32; activations quantized per
    tensor (``s = max(amax / fp8_max, 1e-12)``)."""

    scheme = "fp8_per_tensor"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        set_param(layer, "weight_scale",
                  get_param(layer, "weight_scale").to(torch.float32).reshape(1).contiguous())

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight, w_scale = get_param(layer, "weight"), get_param(layer, "weight_scale")
        fmax = _fp8_max(weight.dtype)
        x2 = rows(x, weight.shape[1], self.scheme)
        if x2.shape[0] <= W8_GEMV_MAX_ROWS:
            return _finish(w8_gemv(x2, weight, w_scale, ACT_TENSOR, WS_TENSOR, fmax, x.dtype,
                                   bias), x)
        x_scale = (x2.abs().amax().to(torch.float32) / fmax).clamp(min=MIN_SCALE).reshape(1)
        q, _ = quantize_rows(x2, weight.dtype, fmax, None, scale=x_scale)
        if _scaled_mm_ok(x2, weight):
            fused_bias = bias is not None and x.dtype in (torch.bfloat16, torch.float16)
            y = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=w_scale,
                                 bias=bias.to(x.dtype) if fused_bias else None,
                                 out_dtype=x.dtype)
            if bias is not None and not fused_bias:
                y = y + bias.to(y.dtype)
            return _finish(y, x)
        y = scaled_gemm(q, weight, x_scale, (0, 0), w_scale, (0, 0), 1, FP8_BLOCK, x.dtype,
                        bias=bias, per_k_scales=True)
        return _finish(y, x)


class Fp8PerChannelLinear(LinearMethod):
    """W8A8 fp8: ``weight [N, K]`` fp8, ``weight_scale [N, 1]`` fp32 per output channel;
    activations quantized per token; the Triton GEMM applies the row and column scales per
    128-column tile (fp32 accumulation)."""

    scheme = "fp8_per_channel"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = get_param(layer, "weight")
        set_param(layer, "weight_scale", get_param(layer, "weight_scale").to(torch.float32)
                  .reshape(weight.shape[0]).contiguous())

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight, w_scale = get_param(layer, "weight"), get_param(layer, "weight_scale")
        fmax = _fp8_max(weight.dtype)
        x2 = rows(x, weight.shape[1], self.scheme)
        if x2.shape[0] <= W8_GEMV_MAX_ROWS:
            return _finish(w8_gemv(x2, weight, w_scale, ACT_ROW, WS_CHANNEL, fmax, x.dtype,
                                   bias), x)
        q, x_scale = quantize_rows(x2, weight.dtype, fmax, None)
        y = scaled_gemm(q, weight, x_scale, (x_scale.stride(0), 0), w_scale, (1, 0), 1,
                        FP8_BLOCK, x.dtype, bias=bias, per_k_scales=True)
        return _finish(y, x)


class Fp8BlockLinear(LinearMethod):
    """W8A8 fp8, DeepSeek style: ``weight [N, K]`` fp8, ``weight_scale_inv [ceil(N/128),
    ceil(K/128)]`` fp32; activations quantized per token and 128-column group; one Triton
    GEMM applies both scales per 128-column tile."""

    scheme = "fp8_block"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight, scale = get_param(layer, "weight"), get_param(layer, "weight_scale_inv")
        n, k = weight.shape
        if scale.shape != (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)):
            raise ValueError(f"fp8_block: weight_scale_inv {tuple(scale.shape)} does not cover "
                             f"weight {tuple(weight.shape)} in 128x128 blocks")
        set_param(layer, "weight_scale_inv", scale.to(torch.float32).contiguous())

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight, w_scale = get_param(layer, "weight"), get_param(layer, "weight_scale_inv")
        fmax = _fp8_max(weight.dtype)
        x2 = rows(x, weight.shape[1], self.scheme)
        if x2.shape[0] <= W8_GEMV_MAX_ROWS:
            return _finish(w8_gemv(x2, weight, w_scale, ACT_GROUP, WS_BLOCK, fmax, x.dtype,
                                   bias), x)
        q, x_scale = quantize_rows(x2, weight.dtype, fmax, FP8_BLOCK)
        y = scaled_gemm(q, weight, x_scale, (x_scale.stride(0), 1), w_scale,
                        (w_scale.stride(0), 1), FP8_BLOCK, FP8_BLOCK, x.dtype, bias=bias,
                        per_k_scales=True)
        return _finish(y, x)


class Int8W8A8Linear(LinearMethod):
    """W8A8 int8: ``weight [N, K]`` int8, ``weight_scale [N, 1]`` fp32 per channel;
    activations quantized per token, symmetric; int32 accumulation, scales in the epilogue."""

    scheme = "int8_w8a8"


    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = get_param(layer, "weight")
        set_param(layer, "weight_scale", get_param(layer, "weight_scale").to(torch.float32)
                  .reshape(weight.shape[0]).contiguous())

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight, w_scale = get_param(layer, "weight"), get_param(layer, "weight_scale")
        x2 = rows(x, weight.shape[1], self.scheme)
        if x2.shape[0] <= W8_GEMV_MAX_ROWS:
            return _finish(w8_gemv(x2, weight, w_scale, ACT_ROW, WS_CHANNEL, 127.0, x.dtype,
                                   bias), x)
        q, x_scale = quantize_rows(x2, torch.int8, 127.0, None)
        y = scaled_gemm(q, weight, x_scale, (x_scale.stride(0), 0), w_scale.reshape(-1), (1, 0),
                        1, weight.shape[1], x.dtype, bias=bias)
        return _finish(y, x)
