"""Decode attention over a paged NHD KV cache with split-KV (two stages).

(Measured on an H200, batch 1: merging in the split kernel -- the last program to arrive,
told by an atomic counter, merges -- took 10.2 us a layer against about 7 us for the two
launches, so the merge stays a second kernel.)

Stage 1: one program per (sequence, KV head, split) handles all query heads of the GQA group
at once (so each K/V tile is read once per group) over its share of the sequence's keys and
writes a normalised partial output plus its log2-sum-exp. Stage 2: one program per (sequence,
query head) merges the splits (with one split, stage 1 writes the output and stage 2 is
not launched). The split count depends only on the batch size and the
configured maximum context length, never on this step's lengths, so a captured graph stays
valid for any sequence length. Each split covers a whole number of ``BLOCK_N`` tiles, so a
short sequence fills only the first few splits (:func:`split_share`); the programs of the
others return at once and the merge reads only the filled ones (on an H200 at batch 1 and
128 keys, 64 splits of which 2 held keys cost 6.3 us against 4.2 us for 8 splits, before the
merge skipped the empty ones).

Through :meth:`TritonAttention.forward_prologue` the split kernel also applies the decoder's
per-head q / k RMSNorm and rotary embedding to the query heads it loads and to the new key
before storing it (:mod:`.attention_prologue`), in place of a separate launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.attention import AttentionLayer, AttentionMetadata, AttentionPrologue
from heteroserve.platforms.triton.attention_prologue import norm_rotate_rows, prologue_args
from heteroserve.platforms.triton.attention_common import (
    NEG_INIT, log2_scores, online_softmax_step, page_slots,
)
from heteroserve.platforms.triton.kv_write import cache_saturation, to_cache
from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.jit_math import exact_fp32, mma
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256


@triton.jit
def split_share(seq_len, start, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(per, filled)``: keys per split (a multiple of ``BLOCK_N``) of a sequence whose keys
    ``[start, seq_len)`` are attended, and how many leading splits hold any (at least 1)."""
    per = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    filled = tl.maximum(tl.cdiv(seq_len - start, tl.maximum(per, 1)), 1)
    return per, filled


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, mid_o_ptr, mid_lse_ptr, k_new_ptr, v_new_ptr, loc_ptr,
    seq_lens_ptr, kv_indptr_ptr, kv_indices_ptr,
    sm_scale, logit_cap, window,
    stride_qt, stride_qh, stride_cs, stride_ch,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    pos_ptr, rope_ptr, qw_ptr, kw_ptr, eps, stride_rope,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    EXACT_FP32: tl.constexpr, WRITE_KV: tl.constexpr, CACHE_MAX: tl.constexpr,
    PROLOGUE: tl.constexpr, QK_NORM: tl.constexpr, ROPE_HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """``PROLOGUE`` (:mod:`.attention_prologue`; needs ``WRITE_KV``): the query heads and the
    new key are normed (``QK_NORM``) and rotated at ``pos_ptr[b]`` as they are loaded."""
    wait_for_previous(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    page_base = tl.load(kv_indptr_ptr + b)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    per, filled = split_share(seq_len, start, NUM_SPLITS, BLOCK_N)
    if split >= filled:  # holds no key (nor the new token): the merge skips it
        return
    s_lo = start + split * per
    s_hi = tl.minimum(s_lo + per, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_rows = q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    if PROLOGUE:
        pos = tl.load(pos_ptr + b)
        q = norm_rotate_rows(q_rows, g_mask[:, None] & d_mask[None, :], offs_d, qw_ptr, pos,
                             rope_ptr, stride_rope, eps, HEAD_DIM, ROPE_HALF, IS_NEOX,
                             QK_NORM)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    if WRITE_KV:  # the split holding the new token stores its K/V before reading them back
        if (seq_len - 1 >= s_lo) & (seq_len - 1 < s_hi):
            slot = tl.load(loc_ptr + b).to(tl.int64)
            dst = slot * stride_cs + kvh * stride_ch + offs_d
            k_row = k_new_ptr + b.to(tl.int64) * stride_knt + kvh * stride_knh
            if PROLOGUE:
                k_new = tl.reshape(norm_rotate_rows(
                    k_row + tl.zeros([1, 1], dtype=tl.int32), d_mask[None, :], offs_d, kw_ptr,
                    pos, rope_ptr, stride_rope, eps, HEAD_DIM, ROPE_HALF, IS_NEOX,
                    QK_NORM), [BLOCK_D])
            else:
                k_new = tl.load(k_row + offs_d, mask=d_mask)
            v_new = tl.load(v_new_ptr + b.to(tl.int64) * stride_vnt + kvh * stride_vnh + offs_d,
                            mask=d_mask)
            tl.store(k_cache_ptr + dst, to_cache(k_new, k_cache_ptr, CACHE_MAX), mask=d_mask)
            tl.store(v_cache_ptr + dst, to_cache(v_new, v_cache_ptr, CACHE_MAX), mask=d_mask)
        tl.debug_barrier()

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    kv_off = kvh * stride_ch + offs_d[None, :]
    for n0 in range(s_lo, s_hi, BLOCK_N):
        k_pos = n0 + tl.arange(0, BLOCK_N)
        n_mask = k_pos < s_hi
        slots = page_slots(kv_indices_ptr, page_base, k_pos, n_mask, PAGE_SIZE)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] * stride_cs + kv_off, mask=kv_mask, other=0.0)
        qk = mma(q, tl.trans(k.to(q.dtype)), EXACT_FP32)
        s = log2_scores(qk, sm_scale, logit_cap, HAS_CAP)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = tl.load(v_cache_ptr + slots[:, None] * stride_cs + kv_off, mask=kv_mask, other=0.0)
        acc, m_i, l_i = online_softmax_step(s, v.to(q.dtype), acc, m_i, l_i, EXACT_FP32)

    has_keys = l_i > 0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mid = (mid_o_ptr + b.to(tl.int64) * stride_mb + heads[:, None] * stride_mh
           + split * stride_ms + offs_d[None, :])
    tl.store(mid, out.to(mid_o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if NUM_SPLITS > 1:  # one split: ``mid_o`` is the output itself, no merge follows
        tl.store(mid_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse,
                 mask=g_mask)


@triton.jit
def decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, o_ptr, seq_lens_ptr, window,
    stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT_BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Merge the filled splits (:func:`split_share` with the split kernel's ``BLOCK_N`` =
    ``SPLIT_BLOCK_N`` and its window) of sequence ``program_id(0)``, query head
    ``program_id(1)``."""
    wait_for_previous(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    _, filled = split_share(seq_len, start, NUM_SPLITS, SPLIT_BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < filled
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(mid_lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - m)
    parts = tl.load(mid_o_ptr + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms
                    + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + b * stride_ot + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=d_mask)


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int,
                      device: torch.device) -> int:
    """Splits per sequence: enough programs to fill the device about twice over, no split
    shorter than ``MIN_KEYS_PER_SPLIT`` keys at ``max_context_len``, at most ``MAX_SPLITS``.
    Depends on no per-step length (graph-capture safe)."""
    want = triton.cdiv(2 * multiprocessors(device), max(1, batch_size * num_kv_heads))
    cap = max(1, triton.cdiv(max_context_len, MIN_KEYS_PER_SPLIT))
    return max(1, min(want, cap, MAX_SPLITS))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor, layer: AttentionLayer, meta: AttentionMetadata,
                     num_kv_heads: int, num_splits: int, block_n: int | None = None,
                     new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     launch: tuple[int, int] | None = None,
                     prologue: AttentionPrologue | None = None) -> torch.Tensor:
    """Fill ``out [B, Hq, D]`` with attention of each sequence's single query ``q [B, Hq, D]``
    (at position ``seq_len - 1``) over its whole paged NHD cache. ``num_splits >= 1``.
    ``new_kv``: this step's ``(k, v)`` ``[B, Hk, D]`` (last dim contiguous); when given, the
    split kernel also stores them at ``meta.out_cache_loc`` (what ``write_kv`` would do)
    before attending, saving a launch. ``launch``: the split kernel's ``(num_warps,
    num_stages)`` instead of the default (tuning). ``prologue`` (with ``new_kv`` only): ``q``
    and ``k`` are un-normed / un-rotated and the kernel applies it (checked by the caller,
    :func:`~.attention_prologue.check_prologue`)."""
    if prologue is not None and new_kv is None:
        raise ValueError("decode_attention: a prologue needs the new K/V (new_kv)")
    bsz, hq, d = q.shape
    if bsz == 0:
        return out
    group = hq // num_kv_heads
    block_d = max(16, triton.next_power_of_2(d))
    if block_n is None:
        block_n = 32 if block_d > 128 or q.dtype == torch.float32 else 64
        if q.device.type == "cpu":  # the interpreter: small tiles exercise the tiling logic
            block_n = 16
    if num_splits == 1:  # the split kernel writes ``out`` directly (strides of [B, H, 1, D])
        mid_o = out.unsqueeze(2)
        mid_lse = out.new_empty((1, 1, 1), dtype=torch.float32)
    else:
        mid_o = torch.empty((bsz, hq, num_splits, d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, hq, num_splits), dtype=torch.float32, device=q.device)
    warps, stages = launch or (4, 2)
    window = layer.sliding_window or 0
    k_new, v_new = new_kv if new_kv is not None else (q, q)
    _decode_split_kernel[(bsz, num_kv_heads, num_splits)](
        q, k_cache, v_cache, mid_o, mid_lse, k_new, v_new, meta.out_cache_loc,
        meta.seq_lens, meta.kv_page_indptr, meta.kv_page_indices,
        float(layer.scale), float(layer.logit_cap or 0.0), int(window),
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        GROUP=group, HEAD_DIM=d, PAGE_SIZE=meta.page_size, NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_CAP=layer.logit_cap is not None, HAS_WINDOW=layer.sliding_window is not None,
        EXACT_FP32=exact_fp32(q.dtype), WRITE_KV=new_kv is not None,
        CACHE_MAX=cache_saturation(k_cache.dtype), **prologue_args(prologue, q),
        num_warps=warps, num_stages=stages, **pdl_args(q.device),
    )
    if num_splits == 1:
        return out
    decode_reduce_kernel[(bsz, hq)](
        mid_o, mid_lse, out, meta.seq_lens, int(window),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, HEAD_DIM=d, SPLIT_BLOCK_N=block_n,
        HAS_WINDOW=layer.sliding_window is not None,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        num_warps=1 if block_d * num_splits <= 1024 else 4, **pdl_args(q.device),
    )
    return out
