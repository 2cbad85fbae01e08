"""Scatter new tokens' K and V into a paged NHD cache (one Triton launch for both).

An fp8 cache stores values rounded to it, saturating at its largest finite value (the
attention contract's rule, ``core/kernels/attention.py``); wider caches take a plain cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def cache_saturation(cache_dtype: torch.dtype) -> float:
    """The largest finite value of a 1-byte float cache dtype (stores clamp to it), else 0.0
    (no clamp)."""
    if cache_dtype.itemsize == 1 and cache_dtype.is_floating_point:
        return float(torch.finfo(cache_dtype).max)
    return 0.0


@triton.jit
def to_cache(x, cache_ptr, CACHE_MAX: tl.constexpr):
    """``x`` converted to the cache's element type, clamped to ``+-CACHE_MAX`` first when
    ``CACHE_MAX`` is non-zero (fp8)."""
    if CACHE_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -CACHE_MAX), CACHE_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, loc_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CACHE_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = offs_h[:, None] * stride_kh + offs_d[None, :]
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + src, mask=mask)
    tl.store(k_cache_ptr + dst, to_cache(k, k_cache_ptr, CACHE_MAX), mask=mask)
    src_v = offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(v_ptr + t * stride_vt + src_v, mask=mask)
    tl.store(v_cache_ptr + dst, to_cache(v, v_cache_ptr, CACHE_MAX), mask=mask)


def check_nhd_cache(cache: torch.Tensor, page_size: int, num_kv_heads: int,
                    head_size: int) -> None:
    """Raise ``ValueError`` unless ``cache`` is ``[pages, page_size, Hk, D]`` with the slot,
    head and element strides of a contiguous tensor (so slot ``s`` starts at ``s * Hk * D``)."""
    if cache.dim() != 4 or tuple(cache.shape[1:]) != (page_size, num_kv_heads, head_size):
        raise ValueError(f"KV cache must be NHD [pages, {page_size}, {num_kv_heads}, "
                         f"{head_size}], got {tuple(cache.shape)}")
    if (cache.stride(3) != 1 or cache.stride(2) != head_size
            or cache.stride(1) != num_kv_heads * head_size
            or cache.stride(0) != page_size * num_kv_heads * head_size):
        raise ValueError("KV cache must be contiguous NHD")


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             out_cache_loc: torch.Tensor) -> None:
    """Store ``k``/``v`` ``[T, Hk, D]`` (last dim contiguous; any token/head strides) at slots
    ``out_cache_loc`` (int ``[T]``) of the contiguous NHD caches, cast to the cache dtype
    (saturating for fp8).
    No other slot changes. Raises ``ValueError`` on mismatched shapes."""
    t, hk, d = k.shape
    if v.shape != k.shape or out_cache_loc.shape != (t,):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)} and "
                         f"out_cache_loc {tuple(out_cache_loc.shape)} disagree")
    if t == 0:
        return
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    _kv_write_kernel[(t,)](
        k, v, k_cache, v_cache, out_cache_loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=hk, HEAD_DIM=d,
        BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(d),
        CACHE_MAX=cache_saturation(k_cache.dtype),
        num_warps=4 if hk * d >= 1024 else 1,
    )
