"""Triton token-bitmask apply, in place (contract: ``TokenBitmaskApplyOp``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _bitmask_kernel(
    logits_ptr, mask_ptr, idx_ptr,
    stride_l, stride_m, vocab, words,
    HAS_INDICES: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    if HAS_INDICES:
        row = tl.load(idx_ptr + i).to(tl.int64)
    else:
        row = i
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab
    word_idx = offs // 32
    word = tl.load(mask_ptr + i * stride_m + word_idx, mask=in_vocab & (word_idx < words),
                   other=0)
    allowed = ((word >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_l + offs,
             tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty),
             mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: torch.Tensor | None = None) -> None:
    """In place: ``logits [B, V]``; ``bitmask`` int32 ``[M, W]`` (token ``t`` allowed iff bit
    ``t % 32`` of word ``t // 32``); row ``i`` of the bitmask masks logits row ``indices[i]``
    (all rows in order when ``indices`` is None, then ``M == B``). Disallowed tokens and
    columns ``>= 32 * W`` become -inf; allowed ones are not written. Raises ``ValueError``
    on mismatched shapes or dtypes."""
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"token_bitmask_apply: logits must be [B, V] and bitmask int32 "
                         f"[M, W], got {tuple(logits.shape)} and {bitmask.dtype}"
                         f"{tuple(bitmask.shape)}")
    if indices is None and bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"token_bitmask_apply: {bitmask.shape[0]} bitmask rows for "
                         f"{logits.shape[0]} logits rows and no indices")
    if indices is not None and indices.shape != (bitmask.shape[0],):
        raise ValueError(f"token_bitmask_apply: indices {tuple(indices.shape)} do not match "
                         f"{bitmask.shape[0]} bitmask rows")
    if logits.stride(1) != 1:
        raise ValueError("token_bitmask_apply: logits rows must be contiguous (in place op)")
    bitmask = bitmask if bitmask.stride(1) == 1 else bitmask.contiguous()
    rows, vocab = bitmask.shape[0], logits.shape[1]
    if rows == 0 or vocab == 0:
        return
    _bitmask_kernel[(rows, triton.cdiv(vocab, _BLOCK))](
        logits, bitmask, indices if indices is not None else bitmask,
        logits.stride(0), bitmask.stride(0), vocab, bitmask.shape[1],
        HAS_INDICES=indices is not None, BLOCK=_BLOCK, num_warps=4)
