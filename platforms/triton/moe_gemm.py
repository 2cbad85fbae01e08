"""The grouped GEMM of fused MoE: one launch multiplies every expert's rows by its weights.

Rows come from :class:`~heteroserve.platforms.triton.moe_align.AlignedPairs`: each row block
belongs to one expert, so a program loads that expert's weight tile once for ``BLOCK_M``
pairs. The first GEMM (``GATED``) keeps two accumulators, gate rows ``n`` and up rows
``N + n`` of ``w13``, and writes ``silu(gate) * up``: SiLU-and-mul never touches memory.
The second multiplies by each pair's routing weight in the epilogue.

Block-scaled weights (``W_SCALED``, fp8_block experts, weight-only): ``w`` holds the stored
values (fp8 e4m3fn; any float dtype runs, which the interpreter tests use) and ``ws`` one
fp32 scale per 128x128 block of each expert. ``BLOCK_K`` divides 128, so a K step lies in
one block column; each tile's product ``a @ w`` (``w`` converted exactly to ``a``'s dtype)
is multiplied by its columns' block scales before it joins the fp32 accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.platforms.triton.jit_math import exact_fp32, mma
from heteroserve.platforms.triton.moe_align import AlignedPairs


@triton.jit
def pair_tile(sorted_ids_ptr, block_experts_ptr, num_rows_ptr, N, num_pairs,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of a grouped MoE GEMM over :class:`AlignedPairs`: ``(live,
    expert, pair [BLOCK_M], r_mask, offs_n [BLOCK_N], n_mask)``. ``GROUP_M`` row blocks
    (mostly one expert's) sweep the N tiles together, so each weight tile is read from DRAM
    once and then hit in L2 by the group's other row blocks; ``live`` is false for a row
    block past the aligned rows (the program then stores nothing)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    first_m = pid // (GROUP_M * num_n) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    live = pid_m * BLOCK_M < tl.load(num_rows_ptr)
    expert = tl.load(block_experts_ptr + pid_m, mask=live, other=0).to(tl.int64)
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return live, expert, pair, pair < num_pairs, offs_n, offs_n < N


@triton.jit
def store_pair_tile(acc, acc_up, c_ptr, route_w_ptr, pair, r_mask, offs_n, n_mask, stride_cm,
                    GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr):
    """The grouped MoE GEMM's epilogue: ``silu(acc) * acc_up`` when ``GATED``, times each
    pair's routing weight when ``MUL_WEIGHT``, stored to the pairs' rows of ``c``."""
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        acc = acc * tl.load(route_w_ptr + pair, mask=r_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, ws_ptr, c_ptr, sorted_ids_ptr, block_experts_ptr, num_rows_ptr, route_w_ptr,
    N, K, num_pairs,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_cm,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    EXACT_FP32: tl.constexpr, W_SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    live, expert, pair, r_mask, offs_n, n_mask = pair_tile(
        sorted_ids_ptr, block_experts_ptr, num_rows_ptr, N, num_pairs, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    a_rows = a_ptr + (pair // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # GATED only
    if W_SCALED:  # the scale rows of this tile's columns (gate and up halves)
        s_cols = ws_ptr + expert * stride_se + (offs_n // SCALE_BLOCK) * stride_sn
        s_up_cols = ws_ptr + expert * stride_se + ((N + offs_n) // SCALE_BLOCK) * stride_sn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_cols + offs_k[:, None], mask=w_mask, other=0.0)
        if W_SCALED:
            s = tl.load(s_cols + k0 // SCALE_BLOCK, mask=n_mask, other=0.0)
            acc += mma(a, w.to(a.dtype), EXACT_FP32) * s[None, :]
        else:
            acc += mma(a, w, EXACT_FP32)
        if GATED:
            w_up = tl.load(w_cols + N * stride_wn + offs_k[:, None], mask=w_mask, other=0.0)
            if W_SCALED:
                s_up = tl.load(s_up_cols + k0 // SCALE_BLOCK, mask=n_mask, other=0.0)
                acc_up += mma(a, w_up.to(a.dtype), EXACT_FP32) * s_up[None, :]
            else:
                acc_up += mma(a, w_up, EXACT_FP32)
    store_pair_tile(acc, acc_up, c_ptr, route_w_ptr, pair, r_mask, offs_n, n_mask, stride_cm,
                    GATED, MUL_WEIGHT)


Config = tuple[int, int, int, int, int]


def moe_configs(num_pairs: int, num_experts: int, dtype: torch.dtype,
                device: torch.device) -> tuple[Config, Config]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` of the gated first GEMM and of
    the second (same ``BLOCK_M``: both walk one alignment), from the mean rows per expert.
    16-bit choices are the fastest of a sweep on an H100 (docs/benchmarks/kernels-h100.md)."""
    if device.type == "cpu":  # the interpreter: small tiles
        return (16, 16, 16, 1, 1), (16, 16, 16, 1, 1)
    avg = num_pairs / max(1, num_experts)
    if dtype == torch.float32:  # twice the bytes per element: half the K tile
        if avg <= 16:
            return (16, 64, 64, 4, 3), (16, 64, 64, 4, 3)
        return (64, 64, 32, 4, 3), (64, 64, 32, 4, 3)
    if avg <= 16:
        return (16, 128, 128, 4, 3), (16, 64, 128, 4, 3)
    if avg <= 512:
        return (64, 64, 64, 4, 3), (64, 128, 64, 4, 3)
    return (128, 64, 64, 8, 3), (128, 128, 64, 8, 3)


def moe_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, pairs: AlignedPairs,
             a_row_div: int, gated: bool, route_weights: torch.Tensor | None,
             config: Config, w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fill row ``p`` of ``out`` for every pair ``p``: ``a[p // a_row_div] @ w[e]^T`` with
    ``e`` the pair's expert (``gated``: ``silu(gate) * up`` over ``w[e]``'s two halves; with
    ``route_weights`` fp32 ``[num_pairs]``, times the pair's weight). ``w [E, N(*2), K]``;
    with ``w_scale`` fp32 ``[E, ceil(N(*2)/128), ceil(K/128)]`` (last dim contiguous) the
    weight is ``w * w_scale[e, n // 128, k // 128]`` (``BLOCK_K`` must divide 128, and with
    ``gated`` ``N`` must be a multiple of 128). Raises ``ValueError`` otherwise."""
    bm, bn, bk, warps, stages = config
    n = out.shape[1]
    k = a.shape[1]
    if w_scale is not None and (FP8_BLOCK % bk or (gated and n % FP8_BLOCK)
                                or w_scale.stride(2) != 1):
        raise ValueError(f"moe_gemm: block scales need BLOCK_K dividing {FP8_BLOCK} (got "
                         f"{bk}), a gated N multiple of {FP8_BLOCK} (got {n}) and contiguous "
                         "scale rows")
    ws = w_scale if w_scale is not None else out
    grid = (pairs.sorted_ids.numel() // bm * triton.cdiv(n, bn),)
    _moe_gemm_kernel[grid](
        a, w, ws, out, pairs.sorted_ids, pairs.block_experts, pairs.num_rows,
        route_weights if route_weights is not None else out,
        n, k, pairs.num_pairs,
        a.stride(0), w.stride(0), w.stride(1),
        ws.stride(0) if w_scale is not None else 0, ws.stride(1) if w_scale is not None else 0,
        out.stride(0),
        A_ROW_DIV=a_row_div, GATED=gated, MUL_WEIGHT=route_weights is not None,
        EXACT_FP32=exact_fp32(a.dtype), W_SCALED=w_scale is not None, SCALE_BLOCK=FP8_BLOCK,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out
