"""Triton per-head q/k RMSNorm + rotary in one launch, in place (contract: ``QKNormRotaryOp``
in ``core/kernels/ops.py``).

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
    x_ptr, w_ptr, t, hblock, cos, sin, eps, stride_xt, stride_xh, num_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
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
    x1 = tl.load(base + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    sumsq = tl.sum(x1 * x1 + x2 * x2, 1)
    if TAIL > 0:
        c_mask2 = h_mask[:, None] & c_mask[None, :]
        xc = tl.load(base + offs_c[None, :], mask=c_mask2, other=0.0).to(tl.float32)
        sumsq += tl.sum(xc * xc, 1)
    inv_rms = (1.0 / tl.sqrt(sumsq / HEAD_DIM + eps))[:, None]
    dtype = x_ptr.dtype.element_ty
    n1 = (x1 * inv_rms * w1[None, :]).to(dtype).to(tl.float32)
    n2 = (x2 * inv_rms * w2[None, :]).to(dtype).to(tl.float32)
    tl.store(base + i1[None, :], (n1 * cos[None, :] - n2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(base + i2[None, :], (n2 * cos[None, :] + n1 * sin[None, :]).to(dtype), mask=mask)
    if TAIL > 0:
        tl.store(base + offs_c[None, :], (xc * inv_rms * wc[None, :]).to(dtype), mask=c_mask2)


@triton.jit
def _qk_norm_rotary_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, pos_ptr, cache_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache, num_q_heads, num_k_heads,
    q_blocks,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, TAIL: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Grid ``(T, q_blocks + k_blocks)``: the first ``q_blocks`` programs of a token take
    query heads, the rest key heads."""
    wait_for_previous(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < HALF
    cos, sin = token_cos_sin(pos_ptr, cache_ptr, t, stride_cache, offs_r, r_mask, HALF)
    if hb < q_blocks:
        _norm_rotate_block(q_ptr, qw_ptr, t, hb, cos, sin, eps, stride_qt, stride_qh,
                           num_q_heads, HEAD_DIM, HALF, TAIL, IS_NEOX, BLOCK_H, BLOCK_R,
                           BLOCK_TAIL)
    else:
        _norm_rotate_block(k_ptr, kw_ptr, t, hb - q_blocks, cos, sin, eps, stride_kt,
                           stride_kh, num_k_heads, HEAD_DIM, HALF, TAIL, IS_NEOX, BLOCK_H,
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
    check_qk_norm_rotary(q, k, q_weight, k_weight)
    t, hq, d = q.shape
    hk = k.shape[1]
    rot_dim = cos_sin_cache.shape[-1]
    if cos_sin_cache.dim() != 2 or rot_dim % 2 or not 0 < rot_dim <= d:
        raise ValueError(f"qk_norm_rotary: cache width {rot_dim} must be even and in "
                         f"1..head size {d}")
    if positions.shape != (t,):
        raise ValueError(f"qk_norm_rotary: positions {tuple(positions.shape)} do not match "
                         f"{t} tokens")
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    if t == 0 or hq + hk == 0:
        return q, k
    half, tail = rot_dim // 2, d - rot_dim
    block_r = triton.next_power_of_2(half)
    block_tail = triton.next_power_of_2(tail) if tail else 1
    tile_d = 2 * block_r + (block_tail if tail else 0)
    block_h = _block_heads(t, hq, hk, tile_d)
    q_blocks = triton.cdiv(hq, block_h)
    tile = block_h * tile_d
    _qk_norm_rotary_kernel[(t, q_blocks + triton.cdiv(hk, block_h))](
        q, k, q_weight, k_weight, positions, cache, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cache.stride(0), hq, hk, q_blocks,
        HEAD_DIM=d, HALF=half, TAIL=tail, IS_NEOX=is_neox, BLOCK_H=block_h, BLOCK_R=block_r,
        BLOCK_TAIL=block_tail, num_warps=min(4, max(1, tile // 256)), **pdl_args(q.device))
    return q, k


# launches only, no host synchronisation: a device graph may capture it
setattr(qk_norm_rotary, GRAPH_SAFE_ATTR, True)
