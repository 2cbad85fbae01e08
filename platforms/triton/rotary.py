"""Triton rotary position embedding (contract: ``RotaryOp`` in ``core/kernels/ops.py``): in
place, or (:func:`rotate_into`) from strided views into fresh contiguous rows."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous


@triton.jit
def pair_offsets(offs_r, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """``(i1, i2)``: the offsets within a head of the two values frequency ``offs_r`` rotates
    together: NeoX halves ``(r, r + HALF)``, else GPT-J adjacent pairs ``(2r, 2r + 1)``."""
    if IS_NEOX:
        return offs_r, offs_r + HALF
    return 2 * offs_r, 2 * offs_r + 1


@triton.jit
def _rotate_block(
    x_ptr, o_ptr, t, hblock, cos, sin, offs_r, r_mask, stride_xt, stride_xh, stride_ot,
    stride_oh, num_heads, HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``BLOCK_H`` heads of token ``t`` rotated from ``x_ptr`` into ``o_ptr`` (the same
    pointer and strides: in place; a destination other than the source gets the rotated dims
    only, so its caller rotates every dim)."""
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    i1, i2 = pair_offsets(offs_r, HALF, IS_NEOX)
    mask = (offs_h < num_heads)[:, None] & r_mask[None, :]
    base = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh
    out = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(out + i1[None, :], o1.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(out + i2[None, :], o2.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def token_cos_sin(pos_ptr, cache_ptr, t, stride_cache, offs_r, r_mask, HALF: tl.constexpr):
    """fp32 ``(cos, sin)`` ``[BLOCK_R]`` of token ``t``'s position from a ``[cos | sin]``
    cache row (``HALF`` frequencies; lanes past ``r_mask`` are 0)."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_cache + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + offs_r, mask=r_mask,
                  other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def rotate_vector(src_ptr, dst_ptr, cos, sin, offs_r, r_mask, HALF: tl.constexpr,
                  IS_NEOX: tl.constexpr):
    """One head vector rotated from ``src_ptr`` into ``dst_ptr`` (the same pointer rotates in
    place), with :func:`_rotate_block`'s arithmetic: fp32, rounded to the destination's
    dtype. ``cos`` / ``sin`` as :func:`token_cos_sin` returns them."""
    i1, i2 = pair_offsets(offs_r, HALF, IS_NEOX)
    x1 = tl.load(src_ptr + i1, mask=r_mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + i2, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + i1, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=r_mask)
    tl.store(dst_ptr + i2, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cache, num_q_heads, num_k_heads, q_blocks,
    HALF: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Grid ``(T, q_blocks + k_blocks)``: the first ``q_blocks`` programs of a token rotate
    query heads (``q`` into ``qo``), the rest key heads (``k`` into ``ko``), one launch for
    both."""
    wait_for_previous(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    cos, sin = token_cos_sin(pos_ptr, cache_ptr, t, stride_cache, offs_r, r_mask, HALF)
    if hb < q_blocks:
        _rotate_block(q_ptr, qo_ptr, t, hb, cos, sin, offs_r, r_mask, stride_qt, stride_qh,
                      stride_qot, stride_qoh, num_q_heads, HALF, IS_NEOX, BLOCK_H)
    else:
        _rotate_block(k_ptr, ko_ptr, t, hb - q_blocks, cos, sin, offs_r, r_mask, stride_kt,
                      stride_kh, stride_kot, stride_koh, num_k_heads, HALF, IS_NEOX, BLOCK_H)


def _rotate(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
            positions: torch.Tensor, cache: torch.Tensor, is_neox: bool) -> None:
    t, hq, _ = q.shape
    hk = k.shape[1]
    half = cache.shape[1] // 2
    block_r = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(hq, hk)), 4096 // block_r))
    q_blocks = triton.cdiv(hq, block_h)
    _rotary_kernel[(t, q_blocks + triton.cdiv(hk, block_h))](
        q, k, q_out, k_out, positions, cache, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cache.stride(0), hq, hk, q_blocks,
        HALF=half, IS_NEOX=is_neox, BLOCK_H=block_h, BLOCK_R=block_r, num_warps=4,
        **pdl_args(q.device))


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
           cos_sin_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary: q and k must be [T, H, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > q.shape[-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rotary: cache width {rot_dim} must be even and <= head size "
                         f"{q.shape[-1]} (k head size {k.shape[-1]})")
    if positions.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(f"rotary: positions {tuple(positions.shape)}, q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)} disagree on the token count")


def _contiguous_rows(cache: torch.Tensor) -> torch.Tensor:
    return cache if cache.stride(1) == 1 else cache.contiguous()


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` in place at ``positions`` (int ``[T]``).

    ``cos_sin_cache`` fp32 ``[max_position, R]`` holds ``[cos | sin]``; the first ``R <= D``
    dims of each head rotate (NeoX halves when ``is_neox``, else GPT-J pairs), the rest are
    untouched. q/k may be strided views (last dim contiguous); a view whose last dim is not
    contiguous is rotated in a copy. Returns ``(q, k)``. Raises ``ValueError`` on inconsistent
    shapes (positions are not range-checked, to avoid a host sync).
    """
    _check(q, k, positions, cos_sin_cache)
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    cache = _contiguous_rows(cos_sin_cache)
    if q.shape[0]:
        _rotate(q, k, q, k, positions, cache, is_neox)
    return q, k


def rotate_into(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                cos_sin_cache: torch.Tensor, is_neox: bool
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`apply_rotary`'s rotation written into fresh contiguous ``[T, Hq, D]`` /
    ``[T, Hk, D]`` tensors, ``q`` and ``k`` (strided views allowed, last dim contiguous)
    left as they are: one pass in place of a rotation plus a copy for a caller that needs
    contiguous rows (cuDNN's attention). None where the rotation covers part of each head
    (the untouched dims would need a copy of their own) or a last dim is strided. Raises
    ``ValueError`` as :func:`apply_rotary` does."""
    _check(q, k, positions, cos_sin_cache)
    if cos_sin_cache.shape[-1] != q.shape[-1] or q.stride(2) != 1 or k.stride(2) != 1:
        return None
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), \
        torch.empty(k.shape, dtype=k.dtype, device=k.device)
    cache = _contiguous_rows(cos_sin_cache)
    if q.shape[0]:
        _rotate(q, k, q_out, k_out, positions, cache, is_neox)
    return q_out, k_out
