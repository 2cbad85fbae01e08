"""The grouped GEMM of fused MoE over 4-bit (``w4a16``) experts: as :mod:`.moe_gemm`, with each
weight tile unpacked and dequantized in registers, so no dense copy of the experts is ever
written (a dense transient of every expert per call ran an H100 out of memory while decode
graphs up to batch 256 were captured for the Qwen3-30B-A3B shape, 2026-12-06 18:56 UTC).

Layout (:class:`~heteroserve.core.kernels.ops.MoEWeightQuant`, scheme ``w4a16``): ``w [E, N,
K // 8]`` int32, feature ``8w + j`` of a row in bits ``4j .. 4j + 3``; fp32 ``scale`` and
int8 ``zero`` ``[E, N, K // G]``. ``BLOCK_K`` divides ``G``, so a K step lies in one group:
the tile's words ``[BLOCK_N, BLOCK_K // 8]`` become ``q * scale - zero * scale`` (one fp32
fma; ``(q - zero) * scale`` up to an fp32 rounding), rounded to ``a``'s dtype and multiplied
on the tensor cores with fp32 accumulation, the weight tile as the left operand (the
products are computed transposed, ``W @ a^T``): a Hopper wgmma takes its left operand from
registers, where the tile was unpacked. The first GEMM (``GATED``) writes ``silu(gate) *
up``; the second multiplies by each pair's routing weight.

On an H100 (2026-12-06, Qwen3-30B-A3B 4-bit, decode graphs at batch 256,
``benchmarks/results/h100-20261206-{2029,2132}-profile_qwen3-30b-a3b-w4a16.txt``) the kernel
before this form took 889 us a call (99.0 ms a step): it unpacked through a reshape and
transpose that went through shared memory (about 16 SASS instructions a weight element) with
the bf16 tiles (about 1 KB of register spills a thread). This form (about 7 instructions an
element, no spill, in sm_90 SASS compiled on the host) took 151.7 us a call (28.2 ms a
step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import exact_fp32, join8, mma
from heteroserve.platforms.triton.moe_align import AlignedPairs
from heteroserve.platforms.triton.moe_gemm import Config, pair_tile, store_pair_tile


@triton.jit
def _w4_tile(w_rows, s_rows, z_rows, k0, n_mask, K, A_DTYPE: tl.constexpr,
             GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dequantized ``[BLOCK_N, BLOCK_K]`` tile at feature ``k0`` of the rows ``w_rows``
    (pointers ``[BLOCK_N]`` to their first words; ``s_rows`` / ``z_rows``: their first scale
    and zero), in ``A_DTYPE``. Each thread unpacks whole words: the eight nibbles of a word
    stay in its registers (:func:`join8`), so the tile needs no shuffle through shared
    memory."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = n_mask[:, None] & (offs_w < K // 8)[None, :]
    words = tl.load(w_rows[:, None] + offs_w[None, :], mask=mask, other=0).to(
        tl.uint32, bitcast=True)
    q = join8(words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF,
              (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, words >> 28)
    q = tl.reshape(q, [BLOCK_N, BLOCK_K]).to(tl.float32)
    s = tl.load(s_rows + k0 // GROUP, mask=n_mask, other=0.0)
    z = tl.load(z_rows + k0 // GROUP, mask=n_mask, other=0).to(tl.float32)
    return (q * s[:, None] - (z * s)[:, None]).to(A_DTYPE)  # one fma an element


@triton.jit
def _moe_gemm_w4_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, sorted_ids_ptr, block_experts_ptr, num_rows_ptr,
    route_w_ptr, N, K, num_pairs,
    stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_cm,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    EXACT_FP32: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    live, expert, pair, r_mask, offs_n, n_mask = pair_tile(
        sorted_ids_ptr, block_experts_ptr, num_rows_ptr, N, num_pairs, BLOCK_M, BLOCK_N, GROUP_M)
    if not live:
        return
    rows = offs_n.to(tl.int64)
    a_rows = a_ptr + (pair // A_ROW_DIV).to(tl.int64)[:, None] * stride_am
    w_rows = w_ptr + expert * stride_we + rows * stride_wn
    s_rows = s_ptr + expert * stride_se + rows * stride_sn
    z_rows = z_ptr + expert * stride_ze + rows * stride_zn
    # transposed products: the dequantized weight tile (in registers) is the left operand,
    # so the tensor cores take it where it was made; the activations come through shared
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # GATED only
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & (offs_k < K)[None, :],
                    other=0.0)
        a_t = tl.trans(a)
        w = _w4_tile(w_rows, s_rows, z_rows, k0, n_mask, K, a.dtype, GROUP, BLOCK_N,
                     BLOCK_K)
        acc += mma(w, a_t, EXACT_FP32)
        if GATED:
            w_up = _w4_tile(w_rows + N * stride_wn, s_rows + N * stride_sn,
                            z_rows + N * stride_zn, k0, n_mask, K, a.dtype, GROUP,
                            BLOCK_N, BLOCK_K)
            acc_up += mma(w_up, a_t, EXACT_FP32)
    store_pair_tile(tl.trans(acc), tl.trans(acc_up), c_ptr, route_w_ptr, pair, r_mask, offs_n,
                    n_mask, stride_cm, GATED, MUL_WEIGHT)


def w4_configs(num_pairs: int, num_experts: int, group: int, device: torch.device
               ) -> tuple[Config, Config]:
    """``(gate_up, down)`` launch shapes of the 4-bit grouped GEMMs. Unpacking costs about 7
    instructions a weight element on sm_90 (``kernel_sass``-style count: this kernel's loop),
    more than the tensor-core work below about 64 rows, and every row block of an expert
    unpacks that expert's tiles again; so ``BLOCK_M`` covers the mean rows per expert (most
    experts then take one row block), ``BLOCK_N`` is 64 (the weight tile is the left operand
    of a Hopper wgmma: 64 rows a warp group, no register spills at ``BLOCK_K`` 128; the
    bf16 table's 128-wide tiles spilled about 1 KB a thread), and ``BLOCK_K`` is the group up
    to 128 (a K step lies in one group). Timed at one shape on an H100 (module docstring),
    not tuned."""
    if device.type == "cpu":  # the interpreter: small tiles
        bk = min(16, group)
        return (16, 16, bk, 1, 1), (16, 16, bk, 1, 1)
    avg = num_pairs / max(1, num_experts)
    bk = min(128, group)
    if avg <= 8:
        cfg = (16, 64, bk, 4, 3)
    elif avg <= 24:
        cfg = (32, 64, bk, 4, 3)
    elif avg <= 96:
        cfg = (64, 64, bk, 4, 3)
    else:
        cfg = (128, 64, bk, 8, 3)
    return cfg, cfg


def moe_gemm_w4(a: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group: int, out: torch.Tensor, pairs: AlignedPairs, a_row_div: int,
                gated: bool, route_weights: torch.Tensor | None, config: Config
                ) -> torch.Tensor:
    """:func:`~.moe_gemm.moe_gemm` over ``w4a16`` experts: fill row ``p`` of ``out`` for
    every pair ``p`` with ``a[p // a_row_div] @ W[e]^T`` (``gated``: ``silu(gate) * up``
    over ``W[e]``'s two halves; with ``route_weights`` fp32 ``[num_pairs]``, times the
    pair's weight), ``W[e, n, k] = (q - zero[e, n, k // G]) * scale[e, n, k // G]`` with
    ``w [E, N(*2), K // 8]`` int32 and ``scale`` / ``zero [E, N(*2), K // G]`` (last dims
    contiguous). ``config``'s ``BLOCK_K`` must be a multiple of 8 dividing ``group``.
    Raises ``ValueError`` otherwise."""
    bm, bn, bk, warps, stages = config
    n = out.shape[1]
    k = a.shape[1]
    if bk % 8 or group % bk or any(t.stride(-1) != 1 for t in (w, scale, zero)):
        raise ValueError(f"moe_gemm_w4: BLOCK_K {bk} must be a multiple of 8 dividing the "
                         f"group {group}, and the weights, scales and zeros need contiguous "
                         "last dims")
    grid = (pairs.sorted_ids.numel() // bm * triton.cdiv(n, bn),)
    _moe_gemm_w4_kernel[grid](
        a, w, scale, zero, out, pairs.sorted_ids, pairs.block_experts, pairs.num_rows,
        route_weights if route_weights is not None else out, n, k, pairs.num_pairs,
        a.stride(0), w.stride(0), w.stride(1), scale.stride(0), scale.stride(1),
        zero.stride(0), zero.stride(1), out.stride(0),
        A_ROW_DIV=a_row_div, GATED=gated, MUL_WEIGHT=route_weights is not None,
        EXACT_FP32=exact_fp32(a.dtype), GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out
