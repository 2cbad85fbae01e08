"""One Triton GEMM for the W8A8 schemes: ``C = (A * sa) @ (B * sb)^T (+ bias)``.

``A [M, K]`` and ``B [N, K]`` are quantized (fp8 or int8; any dtype in tests), ``sa`` is one
fp32 scale per (row, ``scale_k``-column group) and ``sb`` one per (``scale_n``-row group,
``scale_k``-column group), each given by pointer and strides so that per-tensor (strides 0),
per-token / per-channel and 128x128 block scaling are the same kernel. With ``PER_K_SCALES``
the scales change along K (block fp8): each K tile's product is scaled before accumulation
(``BLOCK_K`` divides ``scale_k``); otherwise raw products accumulate (int32 for int8) and
the scales apply once in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import exact_fp32, mma


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr,
    M, N, K, scale_n, scale_k,
    stride_am, stride_bn, stride_cm,
    stride_sam, stride_sak, stride_sbn, stride_sbk,
    PER_K_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, IS_INT: tl.constexpr,
    EXACT_FP32: tl.constexpr, WIDEN_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    sa_rows = sa_ptr + offs_m * stride_sam
    sb_cols = sb_ptr + (offs_n // scale_n) * stride_sbn
    if IS_INT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if WIDEN_FP8:  # e4m3 values are exact in bf16, whose MMA accumulates in full fp32
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
        if PER_K_SCALES:
            kg = k0 // scale_k
            sa = tl.load(sa_rows + kg * stride_sak, mask=m_mask, other=0.0)
            sb = tl.load(sb_cols + kg * stride_sbk, mask=n_mask, other=0.0)
            part = mma(a, b, EXACT_FP32)
            acc += part.to(tl.float32) * sa[:, None] * sb[None, :]
        else:
            acc += mma(a, b, EXACT_FP32)
    if PER_K_SCALES:
        out = acc
    else:
        sa = tl.load(sa_rows, mask=m_mask, other=0.0)
        sb = tl.load(sb_cols, mask=n_mask, other=0.0)
        out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             out.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm_config(m: int, elem_bytes: int, per_k: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` for ``m`` rows of
    ``elem_bytes``-byte operands (BLOCK_K stays a divisor of 128 for block scales). The
    1-byte choices are the fastest of a sweep on an H100 (fp8 with per-K scales prefers
    64-row tiles; int8 128-row ones at large M)."""
    bk = 128 if elem_bytes == 1 else (64 if elem_bytes == 2 else 32)
    if m <= 16:
        return 16, 64, bk, 4, 4
    if m <= 64:
        return 64, 64, bk, 4, 3
    if elem_bytes >= 4:
        return 64, 64, bk, 4, 2
    if per_k or m <= 512:
        return 64, 128, bk, 4, 4
    return 128, 128, bk, 8, 3


def scaled_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                a_scale_strides: tuple[int, int], b_scale: torch.Tensor,
                b_scale_strides: tuple[int, int], scale_n: int, scale_k: int,
                out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                per_k_scales: bool = False,
                config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """``[M, N]`` in ``out_dtype``: ``sum_k a[m,k] * b[n,k] * sa(m, k) * sb(n, k)`` (+ bias),
    where ``sa(m, k) = a_scale[m * s0 + (k // scale_k) * s1]`` for ``a_scale_strides = (s0,
    s1)`` and ``sb(n, k) = b_scale[(n // scale_n) * t0 + (k // scale_k) * t1]``. ``a``/``b``
    must have a contiguous last dim; the scale tensors must be contiguous fp32. fp8 operands
    with an fp32 output are widened to bf16 (exactly) before each product: Hopper's fp8 MMA
    keeps fewer accumulator bits than fp32 (H200 conformance, fp32, K=256-512: 2.1-3.3e-4
    relative error against the 2e-4 bound), its bf16 MMA does not."""
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"scaled_gemm: A {tuple(a.shape)} and B {tuple(b.shape)} disagree on K")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    is_int = a.dtype == torch.int8
    bm, bn, bk, warps, stages = config or gemm_config(m, a.element_size(), per_k_scales)
    if per_k_scales and scale_k % bk:
        raise ValueError(f"scaled_gemm: BLOCK_K {bk} does not divide the scale group {scale_k}")
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _scaled_gemm_kernel[grid](
        a, b, a_scale, b_scale, bias if bias is not None else a_scale, c,
        m, n, k, scale_n, scale_k,
        a.stride(0), b.stride(0), c.stride(0),
        a_scale_strides[0], a_scale_strides[1], b_scale_strides[0], b_scale_strides[1],
        PER_K_SCALES=per_k_scales, HAS_BIAS=bias is not None, IS_INT=is_int,
        EXACT_FP32=exact_fp32(a.dtype),
        WIDEN_FP8=a.element_size() == 1 and not is_int and out_dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )
    return c
