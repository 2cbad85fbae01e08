"""4-bit-weight GEMM (AWQ / GPTQ after repacking): ``C = A @ W`` with ``W`` dequantized in
registers, tile by tile.

Packed layout (what :mod:`.linear_w4a16` repacks both schemes into): ``qweight [K/8, N]``
int32, nibble ``j`` of word ``[w, n]`` = ``q[8w + j, n]``; ``zeros`` and ``scales`` ``[G, N]``
fp16 (true zero points); ``W[k, n] = (q[k, n] - zeros[g(k), n]) * scales[g(k), n]`` with
``g(k) = k // group`` or, with ``g_idx``, ``g_idx[k]``. Small M splits K over several
programs (partial sums in fp32, added in a fixed order: deterministic) when its tiles alone
would leave multiprocessors idle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.jit_math import mma


@triton.jit
def _w4a16_kernel(
    a_ptr, qw_ptr, z_ptr, s_ptr, gidx_ptr, c_ptr,
    M, N, K, group, k_per_split,
    stride_am, stride_qk, stride_zg, stride_sg, stride_cs, stride_cm,
    HAS_G_IDX: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        a = tl.load(a_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        kn_mask = k_mask[:, None] & n_mask[None, :]
        words = tl.load(qw_ptr + (offs_k // 8)[:, None] * stride_qk + offs_n[None, :],
                        mask=kn_mask, other=0)
        q = ((words >> ((offs_k % 8) * 4)[:, None]) & 0xF).to(tl.float32)
        if HAS_G_IDX:
            g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
            z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=kn_mask, other=0.0)
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=kn_mask, other=0.0)
            w = (q - z.to(tl.float32)) * s.to(tl.float32)
        else:
            g = k0 // group
            z = tl.load(z_ptr + g * stride_zg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
        acc += mma(a, w.to(a.dtype), EXACT_FP32)
    tl.store(c_ptr + split * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(group: int, has_g_idx: bool, fp32: bool) -> int:
    """Largest K tile that stays inside one group (any tile works with ``g_idx``)."""
    limit = 32 if fp32 else 128
    if has_g_idx:
        return limit
    for bk in (128, 64, 32, 16):
        if bk <= limit and group % bk == 0:
            return bk
    raise ValueError(f"w4a16: group size {group} is not a multiple of 16")


def w4a16_gemm(a: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
               scales: torch.Tensor, group: int, g_idx: torch.Tensor | None,
               config: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """``a [M, K]`` (fp16/bf16/fp32, last dim contiguous) times the packed 4-bit ``W [K, N]``
    -> ``[M, N]`` in ``a.dtype`` (fp32 accumulation). ``group`` must be a multiple of 16
    unless ``g_idx`` (int32 ``[K]``) is given. ``config``: ``(BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages, splits)`` instead of the built-in choice (tuning)."""
    m, k = a.shape
    n = qweight.shape[1]
    fp32 = a.dtype == torch.float32
    bk = _block_k(group, g_idx is not None, fp32)
    if a.device.type == "cpu":  # the interpreter: small tiles
        bm, bn, bk, warps, stages = 16, 16, min(bk, 16), 1, 1
    elif m <= 16:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        bm, bn, warps, stages = 64, 64, 4, 3
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
        bk = min(bk, 64)
    tiles_k = triton.cdiv(k, bk)
    mn = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    sms = multiprocessors(a.device)  # split K only when the M x N tiles leave SMs idle
    splits = 1 if 2 * mn >= sms else max(1, min(triton.cdiv(sms, mn), tiles_k // 4 or 1, 8))
    if a.device.type == "cpu":
        splits = min(2, tiles_k)
    if config is not None:
        bm, bn, bk, warps, stages, splits = config
        tiles_k = triton.cdiv(k, bk)
    k_per_split = triton.cdiv(tiles_k, splits) * bk
    splits = triton.cdiv(k, k_per_split)
    out_dtype = torch.float32 if splits > 1 else a.dtype
    c = torch.empty((splits, m, n), dtype=out_dtype, device=a.device)
    if m and n:
        _w4a16_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), splits)](
            a, qweight, zeros, scales, g_idx if g_idx is not None else qweight, c,
            m, n, k, group, k_per_split,
            a.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0),
            c.stride(0), c.stride(1),
            HAS_G_IDX=g_idx is not None, EXACT_FP32=fp32,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )
    return c[0] if splits == 1 else c.sum(dim=0).to(a.dtype)
