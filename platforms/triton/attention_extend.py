"""Extend (prefill / chunked prefill) attention over a paged NHD KV cache, flash-attention style.

One program computes ``BLOCK_M`` new tokens of one sequence for one query head. It walks the
sequence's keys in ``BLOCK_N`` tiles through ``kv_page_indices`` (prefix and new tokens alike,
all already in the cache) with an online softmax. Tiles entirely before the block's first
query position need no causal mask and take a separate, cheaper loop; the rest is masked
(causal, sequence end, sliding window).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.attention import AttentionLayer, AttentionMetadata
from heteroserve.platforms.triton.attention_common import (
    NEG_INIT, log2_scores, online_softmax_step, page_slots,
)
from heteroserve.platforms.triton.jit_math import exact_fp32, mma

#: launch the causal query blocks with the most keys first: on an H200 (bf16, head 128, the
#: default tiles) 1.6-2.7 % faster for an 8k prompt and the last 8k chunk of a 32k one, equal
#: at 100k (benchmarks/results/attention_sweep_h200.json)
HEAVY_FIRST = True


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, o_ptr,
    qo_indptr_ptr, prefix_lens_ptr, kv_indptr_ptr, kv_indices_ptr,
    sm_scale, logit_cap, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr, EXACT_FP32: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    if HEAVY_FIRST:  # causal: later query blocks see more keys; start them first
        m_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        m_blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + b)
    ext = tl.load(qo_indptr_ptr + b + 1) - q_start
    if m_blk * BLOCK_M >= ext:
        return
    prefix = tl.load(prefix_lens_ptr + b)
    page_base = tl.load(kv_indptr_ptr + b)
    kvh = h // GROUP

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < ext
    q_pos = prefix + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_first = prefix + m_blk * BLOCK_M
    hi = prefix + tl.minimum((m_blk + 1) * BLOCK_M, ext)
    if HAS_WINDOW:
        lo = tl.maximum(q_first - window + 1, 0) // BLOCK_N * BLOCK_N
        full_end = lo
    else:
        lo = 0
        full_end = q_first // BLOCK_N * BLOCK_N
    kv_off = kvh * stride_ch + offs_d[None, :]
    all_n = tl.full([BLOCK_N], 1, dtype=tl.int1)

    # Tiles strictly before every query of the block: all keys visible, no mask.
    for start in range(lo, full_end, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        slots = page_slots(kv_indices_ptr, page_base, k_pos, all_n, PAGE_SIZE)
        k = tl.load(k_cache_ptr + slots[:, None] * stride_cs + kv_off,
                    mask=d_mask[None, :], other=0.0)
        qk = mma(q, tl.trans(k.to(q.dtype)), EXACT_FP32)
        s = log2_scores(qk, sm_scale, logit_cap, HAS_CAP)
        v = tl.load(v_cache_ptr + slots[:, None] * stride_cs + kv_off,
                    mask=d_mask[None, :], other=0.0)
        acc, m_i, l_i = online_softmax_step(s, v.to(q.dtype), acc, m_i, l_i, EXACT_FP32)

    # The diagonal (and, with a window, every) tile: causal / window / length mask.
    for start in range(full_end, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        n_mask = k_pos < hi
        slots = page_slots(kv_indices_ptr, page_base, k_pos, n_mask, PAGE_SIZE)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] * stride_cs + kv_off, mask=kv_mask, other=0.0)
        qk = mma(q, tl.trans(k.to(q.dtype)), EXACT_FP32)
        s = log2_scores(qk, sm_scale, logit_cap, HAS_CAP)
        allowed = (k_pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if HAS_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        v = tl.load(v_cache_ptr + slots[:, None] * stride_cs + kv_off, mask=kv_mask, other=0.0)
        acc, m_i, l_i = online_softmax_step(s, v.to(q.dtype), acc, m_i, l_i, EXACT_FP32)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def extend_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for padded head size ``block_d`` (the
    16-bit head-size-128 choice is the fastest of a sweep on an H100)."""
    if dtype == torch.float32:
        return (32, 32, 4, 1) if block_d > 128 else (64, 32, 4, 2)
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        return 128, 128, 8, 3
    return 64, 32, 4, 2


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor, layer: AttentionLayer, meta: AttentionMetadata,
                     max_extend_len: int, num_kv_heads: int,
                     config: tuple[int, int, int, int] | None = None,
                     heavy_first: bool = HEAVY_FIRST) -> torch.Tensor:
    """Fill ``out [T, Hq, D]`` with causal attention of ``q [T, Hq, D]`` over the paged NHD
    caches (already holding the new tokens' K/V). ``max_extend_len`` is the host-side largest
    ``extend_len`` (sizes the grid). ``config``: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``
    instead of :func:`extend_config`'s (tests and tuning); ``heavy_first``: launch the query
    blocks with the most keys first (tuning)."""
    t, hq, d = q.shape
    if t == 0 or max_extend_len <= 0:
        return out
    block_d = max(16, triton.next_power_of_2(d))
    bm, bn, warps, stages = extend_config(block_d, q.dtype)
    if q.device.type == "cpu":  # the interpreter: small tiles exercise the tiling logic
        bm, bn = 16, 16
    if config is not None:
        bm, bn, warps, stages = config
    window = layer.sliding_window or 0
    grid = (triton.cdiv(max_extend_len, bm), hq, meta.batch_size)
    _extend_kernel[grid](
        q, k_cache, v_cache, out,
        meta.qo_indptr, meta.prefix_lens, meta.kv_page_indptr, meta.kv_page_indices,
        float(layer.scale), float(layer.logit_cap or 0.0), int(window),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        GROUP=hq // num_kv_heads, HEAD_DIM=d, PAGE_SIZE=meta.page_size,
        BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        HAS_CAP=layer.logit_cap is not None, HAS_WINDOW=layer.sliding_window is not None,
        EXACT_FP32=exact_fp32(q.dtype), HEAVY_FIRST=heavy_first,
        num_warps=warps, num_stages=stages,
    )
    return out
