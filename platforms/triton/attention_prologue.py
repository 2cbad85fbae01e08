"""The qk-norm and rotary embedding folded into the decode split kernel
(:meth:`TritonAttention.forward_prologue`).

A decoder layer's ``q`` / ``k`` go through a per-head RMSNorm (Qwen3, Gemma 3) and the rotary
embedding before attention: one small launch a layer that only reads and rewrites a row. At
decode the split kernel already loads each query head and, in the split holding the new
token, stores that token's K; here those values are normed and rotated in registers on the
way, with the arithmetic of the separate Triton ops (``qk_norm.py``, ``rotary.py``): fp32,
the normed values rounded to the dtype before the rotation, the rotated ones rounded again.

A head's rotation pairs lane ``d`` with a partner lane (NeoX: ``d +- R/2``; GPT-J: ``d ^ 1``)
at frequency ``freq(d)``; lanes past ``R`` pass through. Each tile is loaded twice, once in
lane order and once in partner order, so the rotation needs no register shuffle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.attention import AttentionPrologue

@triton.jit
def rope_lanes(offs_d, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """``(partner, freq, first, rotated)`` per lane ``offs_d`` of a head rotated over its first
    ``2 * HALF`` dims: the lane it pairs with, its frequency index, whether it is the pair's
    first element (``x1 * cos - x2 * sin``) and whether it rotates at all."""
    rotated = offs_d < 2 * HALF
    if IS_NEOX:
        first = offs_d < HALF
        partner = tl.where(first, offs_d + HALF, offs_d - HALF)
        freq = tl.where(first, offs_d, offs_d - HALF)
    else:
        first = (offs_d % 2) == 0
        partner = tl.where(first, offs_d + 1, offs_d - 1)
        freq = offs_d // 2
    return tl.where(rotated, partner, offs_d), tl.where(rotated, freq, 0), first, rotated


@triton.jit
def norm_rotate_rows(rows, mask, offs_d, w_ptr, pos, rope_ptr, stride_rope, eps,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                     NORM: tl.constexpr):
    """Heads ``rows [R, 1]`` (pointers to each head's first element; ``mask [R, BLOCK_D]``)
    normed (``NORM``: RMS over ``HEAD_DIM`` lanes, times ``w_ptr``'s weights, rounded to the
    rows' dtype) and rotated at position ``pos`` with the ``[cos | sin]`` row of
    ``rope_ptr``; ``[R, BLOCK_D]`` in the rows' dtype (masked lanes 0)."""
    partner, freq, first, rotated = rope_lanes(offs_d, HALF, IS_NEOX)
    dtype = rows.dtype.element_ty
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        d_mask = offs_d < HEAD_DIM
        inv_rms = (1.0 / tl.sqrt(tl.sum(x * x, 1) / HEAD_DIM + eps))[:, None]
        w = tl.load(w_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)
        x = (x * inv_rms * w[None, :]).to(dtype).to(tl.float32)
        xp = (xp * inv_rms * wp[None, :]).to(dtype).to(tl.float32)
    row = rope_ptr + pos.to(tl.int64) * stride_rope
    cos = tl.load(row + freq, mask=rotated, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + freq, mask=rotated, other=0.0).to(tl.float32)[None, :]
    out = tl.where(first[None, :], x * cos - xp * sin, x * cos + xp * sin)
    return tl.where(rotated[None, :], out, x).to(dtype)


def check_prologue(prologue: AttentionPrologue, batch_size: int, head_size: int) -> None:
    """Raise ``ValueError`` unless ``prologue`` fits a decode batch of ``batch_size`` heads of
    ``head_size``: ``positions [B]`` int, a 2-D cache of an even width ``R <=
    head_size`` with contiguous rows, norm weights ``[head_size]`` contiguous."""
    cache, pos = prologue.cos_sin_cache, prologue.positions
    if pos.shape != (batch_size,) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention prologue: positions {pos.dtype}{tuple(pos.shape)} do not "
                         f"match {batch_size} sequences")
    if cache.dim() != 2 or cache.shape[1] % 2 or not 0 < cache.shape[1] <= head_size \
            or cache.stride(1) != 1:
        raise ValueError(f"attention prologue: rotary cache {tuple(cache.shape)} must have "
                         f"an even width in 1..{head_size} and contiguous rows")
    for name, w in (("q", prologue.q_norm_weight), ("k", prologue.k_norm_weight)):
        if w is not None and (w.shape != (head_size,) or not w.is_contiguous()):
            raise ValueError(f"attention prologue: {name} norm weight {tuple(w.shape)} is not "
                             f"[{head_size}] contiguous")


def prologue_args(prologue: AttentionPrologue | None, q: torch.Tensor) -> dict:
    """The split kernel's prologue arguments (placeholders pointing at ``q`` without one)."""
    if prologue is None:
        return dict(pos_ptr=q, rope_ptr=q, qw_ptr=q, kw_ptr=q, eps=0.0, stride_rope=0,
                    PROLOGUE=False, QK_NORM=False, ROPE_HALF=1, IS_NEOX=True)
    cache = prologue.cos_sin_cache
    qw = prologue.q_norm_weight if prologue.q_norm_weight is not None else q
    kw = prologue.k_norm_weight if prologue.k_norm_weight is not None else q
    return dict(pos_ptr=prologue.positions, rope_ptr=cache, qw_ptr=qw, kw_ptr=kw,
                eps=float(prologue.eps), stride_rope=cache.stride(0),
                PROLOGUE=True, QK_NORM=prologue.has_norm, ROPE_HALF=cache.shape[1] // 2,
                IS_NEOX=prologue.is_neox)
