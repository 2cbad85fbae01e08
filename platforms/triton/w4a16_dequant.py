"""4-bit weights (the repacked AWQ / GPTQ layout of :mod:`.w4a16_gemm`) dequantized to a dense
``W [K, N]`` in one pass, for the vendor BLAS GEMM at many rows.

From a few hundred rows up a linear is compute-bound, and the BLAS GEMM on a dense 16-bit
weight runs near the tensor cores' rate, which a GEMM that dequantizes in registers
(:func:`~.w4a16_gemm.w4a16_gemm`) does not reach. Writing ``W`` costs ``2 * K * N`` bytes
written and read again, on top of the packed ``K * N / 2`` read: at ``M`` rows that is about
``4.5 / (2 * M)`` bytes per FLOP, small against the GEMM's time once ``M`` is in the hundreds
(``benchmarks/w4_gemm_sweep.py`` measures where the two paths cross, see
:data:`~.linear_w4a16.W4_DEQUANT_MIN_ROWS`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_kernel(
    qw_ptr, z_ptr, s_ptr, gidx_ptr, w_ptr,
    K, N, group,
    stride_qk, stride_zg, stride_sg, stride_wk,
    HAS_G_IDX: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program ``(i, j)``: word rows ``[i * BLOCK_W, (i + 1) * BLOCK_W)`` (weight rows ``8x``
    as many) by columns ``[j * BLOCK_N, (j + 1) * BLOCK_N)``; each packed word is read once."""
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    words = tl.load(qw_ptr + offs_w.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                    mask=(offs_w * 8 < K)[:, None] & n_mask[None, :], other=0)
    for j in tl.static_range(8):
        rows = offs_w * 8 + j
        mask = (rows < K)[:, None] & n_mask[None, :]
        if HAS_G_IDX:
            g = tl.load(gidx_ptr + rows, mask=rows < K, other=0)
        else:
            g = rows // group
        z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=mask, other=0.0)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=mask, other=0.0)
        q = ((words >> (4 * j)) & 0xF).to(tl.float32)
        w = (q - z.to(tl.float32)) * s.to(tl.float32)
        tl.store(w_ptr + rows.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=mask)


def w4a16_dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                     k: int, group: int, g_idx: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """Dense ``W [k, N]`` in ``dtype`` of the packed ``qweight [ceil(k/8), N]`` int32 with
    ``zeros`` / ``scales`` ``[G, N]``: ``W[r, n] = (q[r, n] - zeros[g(r), n]) * scales[g(r),
    n]`` computed in fp32 and rounded once to ``dtype`` (what the dequantizing GEMM multiplies),
    ``g(r) = r // group`` or ``g_idx[r]`` (int32 ``[k]``). A fresh tensor each call (the
    caching allocator reuses the block for the next layer)."""
    n = qweight.shape[1]
    if qweight.shape[0] * 8 < k:
        raise ValueError(f"w4a16_dequantize: {qweight.shape[0]} packed rows hold fewer than {k}")
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    if k == 0 or n == 0:
        return w
    interpreted = qweight.device.type == "cpu"
    block_w, block_n = (8, 64) if interpreted else (16, 128)
    _dequant_kernel[(triton.cdiv(triton.cdiv(k, 8), block_w), triton.cdiv(n, block_n))](
        qweight, zeros, scales, g_idx if g_idx is not None else qweight, w,
        k, n, group, qweight.stride(0), zeros.stride(0), scales.stride(0), w.stride(0),
        HAS_G_IDX=g_idx is not None, BLOCK_W=block_w, BLOCK_N=block_n,
        num_warps=1 if interpreted else 4,
    )
    return w
