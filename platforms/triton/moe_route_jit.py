"""Top-k softmax routing inside the MoE decode kernels (``moe_decode.py``, the
:class:`~heteroserve.core.kernels.ops.MoERouting` path), so a decode step has no routing
launch between the router projection and the experts.

Every program recomputes the routing of its token from the router's logits row: the
softmax probabilities exactly as the ``moe_topk_softmax`` kernel computes them
(``exp(x - max) / sum``, fp32; padding at -1, below every probability), then each expert's
rank, the number of experts that beat it (a higher probability, or an equal one and a lower
id). Ranks are a permutation of ``0 .. E - 1`` and rank ``j`` is the ``j``-th slot of the
top-k op's descending order with its ties to the lower id, so the kernels choose exactly
the experts the op would. The ranks come from one compare-and-count pass over
``[BLOCK_R, CHUNK]`` blocks (one reduction per block instead of the op's ``k`` rounds of
max-and-select; each block reloads its ``CHUNK`` logits from the L1/L2), which keeps the
work a few hundred cycles per program at 128 experts.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_ranks(row_ptr, num_experts, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr):
    """``(probs fp32 [BLOCK_R], ranks int32 [BLOCK_R])`` of the logits row at ``row_ptr``
    (``num_experts`` of them, any float dtype): the softmax probabilities (-1 past
    ``num_experts``) and each position's rank in descending order, ties to the lower id.
    ``CHUNK`` divides ``BLOCK_R``."""
    offs = tl.arange(0, BLOCK_R)
    valid = offs < num_experts
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    top = tl.max(x, 0)
    e = tl.where(valid, tl.exp(x - top), 0.0)
    total = tl.sum(e, 0)
    probs = tl.where(valid, e / total, -1.0)
    ranks = tl.zeros([BLOCK_R], dtype=tl.int32)
    for c in tl.static_range(0, BLOCK_R, CHUNK):
        oj = c + tl.arange(0, CHUNK)
        vj = oj < num_experts
        xj = tl.load(row_ptr + oj, mask=vj, other=float("-inf")).to(tl.float32)
        pj = tl.where(vj, tl.exp(xj - top) / total, -1.0)
        beats = (pj[None, :] > probs[:, None]) | \
            ((pj[None, :] == probs[:, None]) & (oj[None, :] < offs[:, None]))
        ranks += tl.sum(beats.to(tl.int32), axis=1)
    return probs, ranks


@triton.jit
def routed_expert(row_ptr, num_experts, slot, TOP_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  CHUNK: tl.constexpr):
    """The expert id (int32 scalar) of slot ``slot`` of a token whose logits row is at
    ``row_ptr``: its ``slot``-th choice for ``slot < TOP_K``, else the shared expert
    ``num_experts + slot - TOP_K``."""
    _, ranks = softmax_ranks(row_ptr, num_experts, BLOCK_R, CHUNK)
    offs = tl.arange(0, BLOCK_R)
    chosen = tl.sum(tl.where(ranks == slot, offs, 0), 0)
    return tl.where(slot < TOP_K, chosen, num_experts + slot - TOP_K)


@triton.jit
def routed_slots(row_ptr, num_experts, scaling, slots, TOP_K: tl.constexpr,
                 RENORM: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK: tl.constexpr):
    """``(ids int32, weights fp32)`` for the slot indices ``slots`` (a vector): slot
    ``j < TOP_K`` holds the ``j``-th choice with its probability (over the chosen ones'
    sum with ``RENORM``) times ``scaling``; slot ``j >= TOP_K`` the shared expert
    ``num_experts + j - TOP_K`` at weight 1.0."""
    probs, ranks = softmax_ranks(row_ptr, num_experts, BLOCK_R, CHUNK)
    offs = tl.arange(0, BLOCK_R)
    pick = ranks[None, :] == slots[:, None]
    ids = tl.sum(tl.where(pick, offs[None, :], 0), axis=1)
    weights = tl.sum(tl.where(pick, probs[None, :], 0.0), axis=1)
    if RENORM:
        weights = weights / tl.sum(tl.where(ranks < TOP_K, probs, 0.0), 0)
    shared = slots >= TOP_K
    ids = tl.where(shared, num_experts + slots - TOP_K, ids)
    weights = tl.where(shared, 1.0, weights * scaling)
    return ids, weights


def chunk_for(block_r: int) -> int:
    """The compare-and-count block width for ``BLOCK_R`` router outputs (a divisor): blocks
    of at most 2048 compares, 16 a thread at four warps (sm_90 build of the down kernel at
    128 experts: 48 registers a thread with 16-wide blocks, 255 with 32-wide ones)."""
    return max(1, min(block_r, 2048 // block_r))
