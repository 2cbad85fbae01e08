"""W8A8 linear methods: fp8 per-tensor, fp8 per-channel, fp8 128x128 block, int8 per-channel (contract and
checkpoint layouts: ``core/kernels/linear.py``).

Up to :data:`~.w8_gemv.W8_GEMV_MAX_ROWS` rows (the decode step) go through
:func:`~.w8_gemv.w8_gemv`, one launch that quantizes the activation in registers with the same
rule and streams the 1-byte weight at the copy ceiling. Larger inputs: activations are
quantized dynamically by :func:`~.quant.quantize_rows` (per tensor, per token and 128-column
group, per token). Batches above a scheme's :data:`CUBLAS_FP8_MIN_ROWS` (16-bit, K and N
multiples of 16, a CUDA device) run on cuBLASLt's scaled fp8 GEMM (``torch._scaled_mm``): one
scale for fp8 per-tensor; row scales (bf16) for fp8 per-channel and 1x128 / 128x128 block
scales for fp8 block where a probe at load time shows that the device's cuBLASLt has them
(:func:`scaled_mm_supports`). Everything else runs on :func:`~.scaled_gemm.scaled_gemm`,
which accumulates fp8 products in fp32 per 128-column tile, so long K loses no precision to
fast fp8 accumulation.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import FP8_BLOCK, LinearMethod
from heteroserve.platforms.triton.cublas_fp8 import block_scaled_mm, fast_accum, swaps
from heteroserve.platforms.triton.linear_params import get_param, rows, set_param
from heteroserve.platforms.triton.quant import quantize_rows
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


#: rows above which a scheme's GEMM runs on cuBLASLt's scaled fp8 GEMM (``torch._scaled_mm``:
#: one scale, row scales, or 1x128 / 128x128 block scales) instead of the Triton GEMM, where
#: the device has it. Measured on an H200 with ``benchmarks/fp8_gemm_sweep.py``
#: (``benchmarks/results/fp8_gemm_h200.json`` / ``.png``, Llama-3.1-8B's layers, 16-8192
#: rows): block and one-scale cuBLASLt GEMMs win from 16 rows (down_proj at 16 rows: 25.9 vs
#: 50.3 us block, 34.4 vs 56.2 us one scale); the row-scaled one loses at 16 rows (gate_up
#: 51.3 vs 36.1 us) and wins at 64 on three of the four layers.
CUBLAS_FP8_MIN_ROWS: dict[str, int] = {"fp8_block": 4, "fp8_per_channel": 32,
                                       "fp8_per_tensor": 4}


def _scaled_mm_ok(x2: torch.Tensor, weight: torch.Tensor, scheme: str) -> bool:
    """cuBLASLt fp8 for 16-bit batches above the scheme's row threshold whose K and N are
    multiples of 16; fp32 outputs stay on the Triton GEMM, whose 16-row tiles accumulate
    exactly."""
    n, k = weight.shape
    return (x2.device.type == "cuda" and torch.version.hip is None and k % 16 == 0
            and n % 16 == 0 and hasattr(torch, "_scaled_mm")
            and x2.shape[0] > CUBLAS_FP8_MIN_ROWS[scheme] and x2.dtype != torch.float32)


_PROBED: dict[tuple[str, int | None], bool] = {}


def scaled_mm_supports(scheme: str, device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` runs ``scheme``'s scaling on ``device`` (fp8_block:
    1x128 activation and 128x128 weight blocks, cuBLASLt 12.9+ on compute capability 9.x;
    ``fp8_block_swapped``: the same weight-first, :func:`~.cublas_fp8.block_scaled_mm`'s
    ``swap``; fp8_per_channel: row-wise scales). Probed once per device with a small product checked
    against a dequantized matmul; any error or mismatch keeps the Triton GEMM. Call it
    outside graph capture (the layers do, when their weights are processed)."""
    key = (scheme, device.index)
    if key in _PROBED:
        return _PROBED[key]
    ok = False
    if device.type == "cuda" and torch.version.hip is None and hasattr(torch, "_scaled_mm"):
        ok = _probe(scheme, device)
    _PROBED[key] = ok
    return ok


def _probe(scheme: str, device: torch.device) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, n, k = 128, 256, 512
    x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device, torch.float8_e4m3fn)
    try:
        if scheme in ("fp8_block", "fp8_block_swapped"):
            ws = torch.rand(n // FP8_BLOCK, k // FP8_BLOCK, generator=gen).to(device) + 0.5
            y = block_scaled_mm(x, w, ws, 448.0, torch.bfloat16,
                                swap=scheme == "fp8_block_swapped")
            q, xs = quantize_rows(x, w.dtype, 448.0, FP8_BLOCK)
            w_ref = w.float() * ws.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
            x_ref = q.float() * xs.repeat_interleave(FP8_BLOCK, 1)
        else:
            ws = torch.rand(n, generator=gen).to(device) + 0.5
            q, xs = quantize_rows(x, w.dtype, 448.0, None)
            y = torch._scaled_mm(q, w.t(), scale_a=xs, scale_b=ws.reshape(1, n),
                                 out_dtype=torch.bfloat16)
            w_ref, x_ref = w.float() * ws[:, None], q.float() * xs
        ref = x_ref @ w_ref.t()
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        return err < 2e-2
    except (RuntimeError, NotImplementedError, ValueError):
        return False


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
        amax = torch.linalg.vector_norm(x2, float("inf"), dtype=torch.float32)  # one pass
        q, x_scale = quantize_rows(x2, weight.dtype, fmax, None, amax=amax)  # scale in-kernel
        if _scaled_mm_ok(x2, weight, self.scheme):
            fused_bias = bias is not None and x.dtype in (torch.bfloat16, torch.float16)
            y = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=w_scale,
                                 bias=bias.to(x.dtype) if fused_bias else None,
                                 out_dtype=x.dtype, use_fast_accum=fast_accum(self.scheme))
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
        scaled_mm_supports(self.scheme, weight.device)

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
        if (x.dtype == torch.bfloat16 and _scaled_mm_ok(x2, weight, self.scheme)
                and scaled_mm_supports(self.scheme, x.device)):
            y = torch._scaled_mm(q, weight.t(), scale_a=x_scale,
                                 scale_b=w_scale.reshape(1, -1), out_dtype=x.dtype,
                                 use_fast_accum=fast_accum(self.scheme))
            return _finish(y if bias is None else y + bias.to(y.dtype), x)
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
        scaled_mm_supports(self.scheme, weight.device)
        if swaps(n):  # the weight-first layout, probed before capture
            scaled_mm_supports("fp8_block_swapped", weight.device)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight, w_scale = get_param(layer, "weight"), get_param(layer, "weight_scale_inv")
        fmax = _fp8_max(weight.dtype)
        x2 = rows(x, weight.shape[1], self.scheme)
        if x2.shape[0] <= W8_GEMV_MAX_ROWS:
            return _finish(w8_gemv(x2, weight, w_scale, ACT_GROUP, WS_BLOCK, fmax, x.dtype,
                                   bias), x)
        n, k = weight.shape
        if (_scaled_mm_ok(x2, weight, self.scheme) and k % 512 == 0
                and n % FP8_BLOCK == 0 and scaled_mm_supports(self.scheme, x.device)):
            swap = swaps(n) and scaled_mm_supports("fp8_block_swapped", x.device)
            y = block_scaled_mm(x2, weight, w_scale, fmax, x.dtype, swap=swap)
            return _finish(y if bias is None else y + bias.to(y.dtype), x)
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
