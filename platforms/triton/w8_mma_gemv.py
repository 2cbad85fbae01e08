"""W8A8 decode GEMV on the matrix units ("swap AB"): ``y^T = W @ quant(x)^T`` with the
weight tile as the left operand, so a handful of activation rows pads to the 16 columns of
one MMA instead of 64 rows of a GEMM tile.

The CUDA-core GEMV (:mod:`.w8_gemv`) turns every weight byte into fp32 and multiplies it in
registers: several instructions a byte, which keeps it below the copy rate. Here the bytes go
to the matrix unit as they are (fp8 e4m3 x fp8 e4m3, int8 x int8) and the products of one
128-wide K slice come back in one ``tl.dot``; only the activation is quantized in registers,
with :mod:`.w8_gemv`'s arithmetic (same scales, same clamp, same round-to-nearest-even), so the
quantized values are exact in the operand type and the result is the scheme's result.

Each 128-column slice's dot is added to an fp32 accumulator on its own (the matrix unit's
fp8 accumulation is narrower than fp32), which is also where fp8-block's per-slice weight
and activation scales apply. ``ACT_ROW`` / ``ACT_TENSOR`` take one amax pass over the
activation rows first (``[16, AMAX_BLOCK]`` tiles from L2).

Grid: ``cdiv(N, BLOCK_N)``; each program owns ``BLOCK_N`` output features for all ``M <= 16``
rows. Shapes: ``x [M, K]`` (last dim contiguous), ``weight [N, K]`` fp8 or int8 (contiguous
last dim), scales as in :func:`.w8_gemv.w8_gemv`; outputs bf16 or fp16 (fp32 outputs keep the
CUDA-core GEMV: its fp32 accumulation is exact to fp32 rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous
from heteroserve.platforms.triton.quant import MIN_SCALE
from heteroserve.platforms.triton.w8_gemv import (
    ACT_GROUP, ACT_TENSOR, WS_BLOCK, WS_CHANNEL, WS_TENSOR, W8GemvConfig, _fp8_constants,
    _quantize, check_w8_gemv_args, w8_gemv,
)

#: activation rows one program covers (the MMA's narrow side; at most this many rows)
MMA_ROWS = 16
#: whether :func:`w8_decode_gemv` may take the matrix-unit kernel (benchmarks flip it to
#: measure the CUDA-core GEMV side by side)
MMA_GEMV_ENABLED = True


@triton.jit
def _w8_mma_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_wsn, stride_ym, qmax, min_scale,
    ACT: tl.constexpr, WS: tl.constexpr, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, AMAX_BLOCK: tl.constexpr,
    EVEN: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, GROUP)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    wait_for_previous(USE_PDL)

    inv_scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if ACT != 2:  # one scale per row (or per tensor): the amax before the first product
        amax = tl.zeros([BLOCK_M, AMAX_BLOCK], dtype=tl.float32)
        offs_a = tl.arange(0, AMAX_BLOCK)
        for k0 in range(0, K, AMAX_BLOCK):
            kk = k0 + offs_a
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(a.to(tl.float32)))
        row_amax = tl.max(amax, axis=1)
        if ACT == 0:
            row_amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.max(row_amax, axis=0)
        x_scale = tl.maximum(row_amax / qmax, min_scale)
        inv_scale = 1.0 / x_scale

    if WS == 2:
        ws_row = ws_ptr + ((pid * BLOCK_N) // GROUP) * stride_wsn
    else:
        ws_row = ws_ptr
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, GROUP):
        k_mask = (k0 + offs_k) < K
        if EVEN:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
        if ACT == 2:  # per row and 128 columns: this slice's own scale
            g_scale = tl.maximum(tl.max(tl.abs(a), axis=1) / qmax, min_scale)
            q = _quantize(a, (1.0 / g_scale)[:, None], qmax, IS_INT, MIN_NORMAL, SUB_MAGIC)
        else:
            q = _quantize(a, inv_scale[:, None], qmax, IS_INT, MIN_NORMAL, SUB_MAGIC)
        q = q.to(w.dtype)  # exact: q is on the operand's grid
        if IS_INT:
            part = tl.dot(w, tl.trans(q), out_dtype=tl.int32).to(tl.float32)
        else:
            part = tl.dot(w, tl.trans(q), out_dtype=tl.float32)
        if ACT == 2:
            s = g_scale
            if WS == 2:
                s = s * tl.load(ws_row + k0 // GROUP)
            acc += part * s[None, :]
        elif WS == 2:
            acc += part * tl.load(ws_row + k0 // GROUP)
        else:
            acc += part
        w_ptrs += GROUP
        x_ptrs += GROUP

    if ACT != 2:
        acc = acc * x_scale[None, :]
    if WS == 0:
        acc = acc * tl.load(ws_ptr)
    elif WS == 1:
        acc = acc * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@dataclass(frozen=True)
class W8MmaConfig:
    """Launch shape: output features per program, warps, pipeline stages (the K step is
    one 128-column slice)."""

    block_n: int
    num_warps: int
    num_stages: int


def w8_mma_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, act: int,
                ws: int, qmax: float, out_dtype: torch.dtype, bias: torch.Tensor | None,
                config: W8MmaConfig) -> torch.Tensor:
    """:func:`.w8_gemv.w8_gemv`'s contract (same arguments and result) for ``M <= 16`` rows
    and bf16/fp16 outputs, on the matrix units. The caller has validated the shapes
    (:func:`.w8_gemv.check_w8_gemv_args`). Raises ``ValueError`` for more rows, an fp32 output, or a config whose ``block_n`` does
    not lie inside one 128-row scale block."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MMA_ROWS or out_dtype == torch.float32:
        raise ValueError(f"w8_mma_gemv: {m} rows / {out_dtype} output (at most {MMA_ROWS} "
                         "rows, bf16 or fp16)")
    if ws == WS_BLOCK and FP8_BLOCK % config.block_n:
        raise ValueError(f"w8_mma_gemv: {config} does not tile 128x128 scale blocks")
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    min_normal, sub_magic = _fp8_constants(weight.dtype)
    _w8_mma_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, weight_scale, bias if bias is not None else y, y, m, n, k,
        x.stride(0), weight.stride(0), weight_scale.stride(0) if ws == WS_BLOCK else 0,
        y.stride(0), float(qmax), MIN_SCALE,
        ACT=act, WS=ws, IS_INT=not weight.dtype.is_floating_point, HAS_BIAS=bias is not None,
        MIN_NORMAL=min_normal, SUB_MAGIC=sub_magic, BLOCK_N=config.block_n,
        BLOCK_M=MMA_ROWS, GROUP=FP8_BLOCK,
        AMAX_BLOCK=128 if x.device.type == "cpu" else min(512, triton.next_power_of_2(k)),
        EVEN=n % config.block_n == 0 and k % FP8_BLOCK == 0, num_warps=config.num_warps, num_stages=config.num_stages, **pdl_args(x.device))
    return y


def mma_gemv_applies(device: torch.device, out_dtype: torch.dtype, rows: int) -> bool:
    """Whether the matrix-unit GEMV runs here: an NVIDIA GPU with fp8 MMA (compute
    capability 8.9 or newer), bf16/fp16 output, at most :data:`MMA_ROWS` rows."""
    if not MMA_GEMV_ENABLED or device.type != "cuda" or torch.version.hip is not None:
        return False
    return (out_dtype in (torch.bfloat16, torch.float16) and rows <= MMA_ROWS
            and torch.cuda.get_device_capability(device) >= (8, 9))


def choose_mma_config(n: int, device: torch.device) -> W8MmaConfig:
    """The widest program (64, 32 or 16 output features) that still gives every
    multiprocessor two programs; four warps at 64, two below; four pipeline stages."""
    if device.type == "cpu":  # the interpreter
        return W8MmaConfig(16, 1, 1)
    sms = multiprocessors(device)
    block_n = 64
    while block_n > 16 and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    return W8MmaConfig(block_n, 4 if block_n >= 64 else 2, 4)


def w8_decode_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   act: int, ws: int, qmax: float, out_dtype: torch.dtype,
                   bias: torch.Tensor | None = None,
                   config: W8GemvConfig | W8MmaConfig | None = None) -> torch.Tensor:
    """The decode GEMV of the W8A8 schemes: :func:`.w8_gemv.w8_gemv`'s contract, run on the
    matrix units where :func:`mma_gemv_applies` (or when ``config`` is a
    :class:`W8MmaConfig`), else on the CUDA cores."""
    if isinstance(config, W8MmaConfig) or (
            config is None and mma_gemv_applies(x.device, out_dtype, x.shape[0])):
        check_w8_gemv_args(x, weight, weight_scale, ws)
        return w8_mma_gemv(x, weight, weight_scale, act, ws, qmax, out_dtype, bias,
                           config or choose_mma_config(weight.shape[0], x.device))
    return w8_gemv(x, weight, weight_scale, act, ws, qmax, out_dtype, bias, config)


__all__ = ["ACT_GROUP", "ACT_TENSOR", "MMA_ROWS", "W8MmaConfig", "WS_CHANNEL", "WS_TENSOR",
           "choose_mma_config", "mma_gemv_applies", "w8_decode_gemv", "w8_mma_gemv"]
