"""Triton building blocks shared by the extend and decode attention kernels.

Scores are kept in log2 units (``score * log2(e)``) so the online softmax uses ``exp2``.
The running max starts at a large finite negative value rather than ``-inf`` so that a row
whose first key blocks are all masked never computes ``-inf - (-inf)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import mma, tanh

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INIT = tl.constexpr(-1.0e30)


@triton.jit
def page_slots(kv_indices_ptr, page_base, k_pos, n_mask, PAGE_SIZE: tl.constexpr):
    """int64 cache slots of key positions ``k_pos`` of the sequence whose pages start at
    ``kv_indices_ptr[page_base]``; masked positions map to slot 0 (never dereferenced)."""
    page = tl.load(kv_indices_ptr + page_base + k_pos // PAGE_SIZE, mask=n_mask, other=0)
    return page.to(tl.int64) * PAGE_SIZE + k_pos % PAGE_SIZE


@triton.jit
def log2_scores(qk, sm_scale, logit_cap, HAS_CAP: tl.constexpr):
    """``q.k`` -> scaled (and soft-capped: ``c * tanh(s / c)``) scores in log2 units."""
    if HAS_CAP:
        s = qk * sm_scale
        s = logit_cap * tanh(s / logit_cap)
        return s * LOG2E
    else:
        return qk * (sm_scale * LOG2E)


@triton.jit
def online_softmax_step(s, v, acc, m_i, l_i, EXACT_FP32: tl.constexpr):
    """Fold one block of log2 scores ``s [M, N]`` (masked entries ``-inf``) and values
    ``v [N, D]`` into the running ``acc [M, D]``, max ``m_i [M]`` and sum ``l_i [M]``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, EXACT_FP32)
    return acc, m_new, l_i
