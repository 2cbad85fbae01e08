"""Triton per-head q/k RMSNorm + rotary in one launch (contract: ``QKNormRotaryOp`` in
``core/kernels/ops.py``): in place, or (:func:`qk_norm_rotary_into`) from strided views into
fresh contiguous rows.

A program takes ``BLOCK_H`` heads of one token (query heads or key heads) and loads each head
element once, split as the rotation pairs it: ``x1``/``x2`` (NeoX halves or GPT-J even/odd
dims of the first ``R``) and the pass-through ``tail`` (dims ``R..D``). The sum of squares over
the three parts gives the head's RMS; the normalised values are rounded to the dtype (what
the ``rms_norm`` op would store) before the fp32 rotation, so the result equals the Triton
``rms_norm`` then ``rotary_embedding`` pair.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.ops import GRAPH_SAFE_ATTR
from heteroserve.platforms.cpu.qk_norm import check_qk_norm_rotary
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous
from heteroserve.platforms.triton.rotary import pair_offsets, token_cos_sin

#: elements of one program's tile (heads x head size); bounds registers per program
MAX_TILE = 4096
#: below this many programs, fewer heads a program (batch-1 decode: spread over more SMs)
MIN_PROGRAMS = 128


@triton.jit
def _norm_rotate_block(
    x_ptr, o_ptr, w_ptr, t, hblock, cos, sin, eps, stride_xt, stride_xh, stride_ot, stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    """``BLOCK_H`` heads of token ``t`` normed and rotated from ``x_ptr`` into ``o_ptr`` (the
    same pointer and strides: in place); every dim of a head is written."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    i1, i2 = pair_offsets(offs_r, HALF, IS_NEOX)
    w1 = tl.load(w_ptr + i1, mask=r_mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + i2, mask=r_mask, other=0.0).to(tl.float32)
    offs_c = 2 * HALF + tl.arange(0, BLOCK_TAIL)
    c_mask = offs_c < HEAD_DIM
    if TAIL > 0:
        wc = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    offs_h = hblock * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    mask = h_mask[:, None] & r_mask[None, :]
    base = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh
    out = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    sumsq = tl.sum(x1 * x1 + x2 * x2, 1)
    if TAIL > 0:
        c_mask2 = h_mask[:, None] & c_mask[None, :]
        xc = tl.load(base + offs_c[None, :], mask=c_mask2, other=0.0).to(tl.float32)
        sumsq += tl.sum(xc * xc, 1)
    inv_rms = (1.0 / tl.sqrt(sumsq / HEAD_DIM + eps))[:, None]
    dtype = o_ptr.dtype.element_ty
    n1 = (x1 * inv_rms * w1[None, :]).to(dtype).to(tl.float32)
    n2 = (x2 * inv_rms * w2[None, :]).to(dtype).to(tl.float32)
    tl.store(out + i1[None, :], (n1 * cos[None, :] - n2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(out + i2[None, :], (n2 * cos[None, :] + n1 * sin[None, :]).to(dtype), mask=mask)
    if TAIL > 0:
        tl.store(out + offs_c[None, :], (xc * inv_rms * wc[None, :]).to(dtype), mask=c_mask2)


@triton.jit
def _qk_norm_rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, qw_ptr, kw_ptr, pos_ptr, cache_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_cache, num_q_heads, num_k_heads, q_blocks,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Grid ``(T, q_blocks + k_blocks)``: the first ``q_blocks`` programs of a token take
    query heads (``q`` into ``qo``), the rest key heads (``k`` into ``ko``)."""
    wait_for_previous(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    cos, sin = token_cos_sin(pos_ptr, cache_ptr, t, stride_cache, offs_r, r_mask, HALF)
    if hb < q_blocks:
        _norm_rotate_block(q_ptr, qo_ptr, qw_ptr, t, hb, cos, sin, eps, stride_qt, stride_qh,
                           stride_qot, stride_qoh, num_q_heads, HEAD_DIM, HALF, TAIL, IS_NEOX, BLOCK_H, BLOCK_R,
                           BLOCK_TAIL)
    else:
        _norm_rotate_block(k_ptr, ko_ptr, kw_ptr, t, hb - q_blocks, cos, sin, eps, stride_kt,
                           stride_kh, stride_kot, stride_koh, num_k_heads, HEAD_DIM, HALF, TAIL, IS_NEOX, BLOCK_H,
                           BLOCK_R, BLOCK_TAIL)


def _block_heads(tokens: int, hq: int, hk: int, tile_d: int) -> int:
    """Heads a program: as many as fit :data:`MAX_TILE`, halved while the grid would have
    fewer than :data:`MIN_PROGRAMS` programs (a power of 2, at least 1). ``tile_d``: the
    padded elements a head takes in the tile."""
    fits = max(1, MAX_TILE // tile_d)
    block_h = min(triton.next_power_of_2(max(hq, hk)), 1 << (fits.bit_length() - 1))
    while block_h > 1 and tokens * (triton.cdiv(hq, block_h) + triton.cdiv(hk, block_h)) \
            < MIN_PROGRAMS:
        block_h //= 2
    return block_h


def _check(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
           positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    check_qk_norm_rotary(q, k, q_weight, k_weight)
    rot_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot_dim % 2 or not 0 < rot_dim <= q.shape[2]:
        raise ValueError(f"qk_norm_rotary: cache width {rot_dim} must be even and in "
                         f"1..head size {q.shape[2]}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"qk_norm_rotary: positions {tuple(positions.shape)} do not match "
                         f"{q.shape[0]} tokens")


def _launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor,
            q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
            positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """The kernel from ``q``/``k`` into ``q_out``/``k_out`` (last dims contiguous)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if t == 0 or hq + hk == 0:
        return
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    rot_dim = cache.shape[-1]
    half, tail = rot_dim // 2, d - rot_dim
    block_r = triton.next_power_of_2(half)
    block_tail = triton.next_power_of_2(tail) if tail else 1
    tile_d = 2 * block_r + (block_tail if tail else 0)
    block_h = _block_heads(t, hq, hk, tile_d)
    q_blocks = triton.cdiv(hq, block_h)
    tile = block_h * tile_d
    _qk_norm_rotary_kernel[(t, q_blocks + triton.cdiv(hk, block_h))](
        q, k, q_out, k_out, q_weight, k_weight, positions, cache, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_out.stride(0), q_out.stride(1),
        k_out.stride(0), k_out.stride(1), cache.stride(0), hq, hk, q_blocks,
        HEAD_DIM=d, HALF=half, TAIL=tail, IS_NEOX=is_neox, BLOCK_H=block_h, BLOCK_R=block_r,
        BLOCK_TAIL=block_tail, num_warps=min(4, max(1, tile // 256)), **pdl_args(q.device))


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, is_neox: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm each head of ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (fp32 math, rounded to the
    dtype) and rotate the first ``R`` dims at ``positions`` (int ``[T]``) with
    ``cos_sin_cache`` fp32 ``[max_position, R]``, in place, one launch.

    q/k may be strided views (last dim contiguous; one whose last dim is not is processed in
    a contiguous copy); only their own elements are written. Returns ``(q, k)``. Raises
    ``ValueError`` on inconsistent shapes or dtypes (positions are not range-checked, to
    avoid a host sync)."""
    _check(q, k, q_weight, k_weight, positions, cos_sin_cache)
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    _launch(q, k, q, k, q_weight, k_weight, eps, positions, cos_sin_cache, is_neox)
    return q, k


def qk_norm_rotary_into(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, is_neox: bool
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`qk_norm_rotary`'s result written into fresh contiguous ``[T, Hq, D]`` /
    ``[T, Hk, D]`` tensors, ``q`` and ``k`` (strided views allowed) left as they are: one pass
    in place of the op plus a copy for a caller that needs contiguous rows (cuDNN's
    attention). Every dim is written (the norm covers the whole head), so a partial rotation
    is taken too. None where a last dim is strided. Raises ``ValueError`` as
    :func:`qk_norm_rotary` does."""
    _check(q, k, q_weight, k_weight, positions, cos_sin_cache)
    if q.stride(2) != 1 or k.stride(2) != 1:
        return None
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, q_out, k_out, q_weight, k_weight, eps, positions, cos_sin_cache, is_neox)
    return q_out, k_out


# launches only, no host synchronisation: a device graph may capture it
setattr(qk_norm_rotary, GRAPH_SAFE_ATTR, True)
