"""Small pieces of Triton math shared by several kernels of this package."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """``tanh`` through ``exp`` (exact limits at +-inf; portable to every Triton backend)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def gate_activation(g, ACT: tl.constexpr):
    """``act(g)`` of fp32 ``g`` for a gated activation ``ACT``: ``silu``, ``gelu`` (erf) or
    ``gelu_tanh`` (the tanh approximation)."""
    if ACT == "silu":
        return g / (1.0 + tl.exp(-g))
    elif ACT == "gelu":
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))


@triton.jit
def split8(v):
    """``v [..., 2, 2, 2]`` (a last dim of 8, reshaped) -> its eight columns ``[...]`` in
    order (no data movement: a thread holding the eight keeps them in registers)."""
    even, odd = tl.split(v)
    c04, c26 = tl.split(even)
    c15, c37 = tl.split(odd)
    c0, c4 = tl.split(c04)
    c2, c6 = tl.split(c26)
    c1, c5 = tl.split(c15)
    c3, c7 = tl.split(c37)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def join8(c0, c1, c2, c3, c4, c5, c6, c7):
    """The inverse of :func:`split8`: eight ``[...]`` columns -> ``[..., 2, 2, 2]`` whose
    reshape to a last dim of ``8 * n`` holds them in order (no data movement: each thread
    keeps the eight values of one position in its registers)."""
    even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.join(even, odd)


@triton.jit
def select_top_k(work, values, offs, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """``(weights fp32 [BLOCK_K], ids int32 [BLOCK_K])``: the ``TOP_K`` largest entries of
    ``work [BLOCK_E]`` in descending order (ties: the lower of ``offs``), each weighted by
    ``values`` at its position; slots past ``TOP_K`` hold 0. Entries that must never be picked
    are below every candidate in ``work`` (e.g. -inf)."""
    kk = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(work, 0)
        idx = tl.min(tl.where(work == best, offs, BLOCK_E), 0)
        weights = tl.where(kk == j, tl.sum(tl.where(offs == idx, values, 0.0), 0), weights)
        ids = tl.where(kk == j, idx, ids)
        work = tl.where(offs == idx, float("-inf"), work)
    return weights, ids


@triton.jit
def mma(a, b, EXACT_FP32: tl.constexpr):
    """``tl.dot(a, b)``; with ``EXACT_FP32`` the fp32 products are exact (``ieee``) instead of
    the backend's default (tf32 on NVIDIA), which the fp32 tolerances need. 16-bit, fp8 and
    int8 operands never pass it."""
    if EXACT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


def exact_fp32(dtype: torch.dtype) -> bool:
    """Whether dots over operands of ``dtype`` must use exact fp32 products."""
    return dtype == torch.float32


@triton.jit
def fold2(prod, ROWS: tl.constexpr, COLS: tl.constexpr, FOLD: tl.constexpr):
    """``prod [ROWS, COLS]`` with each ``FOLD`` adjacent columns summed: ``[ROWS, COLS //
    FOLD]`` (``FOLD`` 1: ``prod`` itself). With ``FOLD`` the columns one thread loads in one
    vector, the sum stays in its registers and an accumulator of the result's shape needs
    ``FOLD`` times fewer of them."""
    if FOLD == 1:
        return prod
    else:
        return tl.sum(tl.reshape(prod, [ROWS, COLS // FOLD, FOLD]), axis=2)


@triton.jit
def fold2_into(acc, prod, ROWS: tl.constexpr, COLS: tl.constexpr, FOLD: tl.constexpr):
    """``acc + fold2(prod, ROWS, COLS, FOLD)`` with each group's 16 products (``FOLD`` 16, a
    16-byte load of 1-byte weights) added to ``acc`` one after another rather than by a
    tree: the adds contract with the products' multiplies into one fma per element (a tree
    needs a multiply, then an add, for half of them). Other ``FOLD`` values take
    :func:`fold2`'s tree."""
    if FOLD == 16:
        lo, hi = tl.split(tl.reshape(prod, [ROWS, COLS // 16, 2, 2, 2, 2]))
        a = split8(lo)
        b = split8(hi)
        acc = acc + a[0] + b[0] + a[1] + b[1] + a[2] + b[2] + a[3] + b[3]
        return acc + a[4] + b[4] + a[5] + b[5] + a[6] + b[6] + a[7] + b[7]
    else:
        return acc + fold2(prod, ROWS, COLS, FOLD)


@triton.jit
def fold3(prod, A: tl.constexpr, B: tl.constexpr, COLS: tl.constexpr, FOLD: tl.constexpr):
    """:func:`fold2` for ``prod [A, B, COLS]``."""
    if FOLD == 1:
        return prod
    else:
        return tl.sum(tl.reshape(prod, [A, B, COLS // FOLD, FOLD]), axis=3)
