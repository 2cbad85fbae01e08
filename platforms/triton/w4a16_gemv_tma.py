"""The one-row 4-bit GEMV of :mod:`.w4a16_gemv` with its weight words brought in by the Tensor
Memory Accelerator (Hopper's TMA) through a multi-stage shared-memory pipeline.

Why: the register-tile kernel keeps at most one tile of words in flight per program (its
loads are plain pointer loads, which Triton's pipeliner leaves alone), so the bytes in flight
per multiprocessor are bounded by registers and occupancy. On an H100 it streams Llama-3.1-8B's
layers at about 2.1 TB/s of the 3.0 TB/s copy rate, and the H200's higher copy rate gains it
little (W4A16 batch-1 decode 72.6 % of its roofline on the H100 against 57.8 % on the H200).
Here each word row set of a tile is a TMA load (a tensor descriptor), which Triton's
software pipeliner multi-buffers in shared memory ``NUM_STAGES`` deep: while a tile's products
run, the next ``NUM_STAGES - 1`` tiles are in flight without holding registers.

Same layout, arithmetic and contract as :func:`.w4a16_gemv.w4a16_gemv` (the nibble decodings,
the per-thread word rows, ``|x| < 2**39``), on ``[T, BLOCK_N]`` tiles
(:func:`.w4a16_gemv.row_dot`).
Out-of-range word rows and columns read as zero from the TMA (its boxes are bounds-checked),
so there is no separate tail loop: ``x``, the zero points and the scales are masked loads,
unmasked where the tiles divide ``K`` and ``N`` (``EVEN``: 4.05 SASS instructions a nibble
against 4.17 masked, sm_90 under Triton 3.6).
Needs: ``N % 4 == 0`` (the descriptor's row stride, ``4 N`` bytes, a multiple of 16) and
``ROWS`` dividing ``ceil(K / 8)`` (the 3-D view ``[kw / ROWS, ROWS, N]``); :func:`fits`
says whether a shape does. The PDL wait precedes the first weight load (the pipeliner's
prologue), unlike the register-tile kernel, which loads its first tile before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import split8
from heteroserve.platforms.triton.pdl import pdl_args, prefetch_to_l2, wait_for_previous
from heteroserve.platforms.triton.w4a16_gemv import (
    NIBBLE_EXPONENT, NIBBLE_SUBNORMAL, TO_DOMAIN, UNSCALE, nibble_factors, row_dot,
    rows_per_thread,
)

try:  # Triton >= 3.4 (host-side tensor descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: fits() answers False
    TensorDescriptor = None


@triton.jit
def _w4a16_gemv_tma_kernel(
    x_ptr, qw_desc, qw_ptr, z_ptr, s_ptr, bias_ptr, y_ptr, N, K,
    stride_xm, stride_zg, stride_sg, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    ROWS: tl.constexpr, GROUP_W: tl.constexpr, SUBNORMAL: tl.constexpr,
    NUM_STAGES: tl.constexpr, EVEN: tl.constexpr, PREFETCH_ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """See the module. ``qw_desc``: the words as ``[kw / ROWS, ROWS, N]`` int32, box ``[T, 1,
    BLOCK_N]`` with ``T = BLOCK_KW / ROWS``. Tiles are ``[T, BLOCK_N]``: thread row ``t``
    holds word rows ``w0 + t * ROWS + m``, ``m < ROWS``, which lie in one group."""
    T: tl.constexpr = BLOCK_KW // ROWS
    row = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_t = tl.arange(0, T) * ROWS
    kw = tl.cdiv(K, 8)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros([T, BLOCK_N], dtype=tl.float32)
    if PREFETCH_ROWS > 0:  # the first tiles' word rows, one L2 line request a row
        pf = tl.minimum(tl.arange(0, PREFETCH_ROWS), kw - 1)
        prefetch_to_l2(qw_ptr + pf.to(tl.int64) * N + n0, USE_PDL)
    wait_for_previous(USE_PDL)
    for i in tl.range(0, tl.cdiv(kw, BLOCK_KW), num_stages=NUM_STAGES):
        w0 = i * BLOCK_KW
        ww = w0 + offs_t  # [T]
        g = (ww // GROUP_W)[:, None]
        if EVEN:
            z = tl.load(z_ptr + g * stride_zg + offs_n[None, :])
            s = tl.load(s_ptr + g * stride_sg + offs_n[None, :])
        else:
            zs_mask = (ww < kw)[:, None] & n_mask[None, :]
            z = tl.load(z_ptr + g * stride_zg + offs_n[None, :], mask=zs_mask, other=0.0)
            s = tl.load(s_ptr + g * stride_sg + offs_n[None, :], mask=zs_mask, other=0.0)
        dot = tl.zeros([T, BLOCK_N], dtype=tl.float32)
        x_sum = tl.zeros([T], dtype=tl.float32)
        for m in tl.static_range(ROWS):
            w = tl.reshape(qw_desc.load([w0 // ROWS, m, n0]), [T, BLOCK_N])
            kk = (ww + m)[:, None] * 8 + tl.arange(0, 8)[None, :]
            if EVEN:
                x8 = tl.load(x_row + kk).to(tl.float32)
            else:
                x8 = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            xs, total = nibble_factors(split8(tl.reshape(x8, [T, 2, 2, 2])), SUBNORMAL)
            x_sum += total
            dot = row_dot(w, xs, dot, SUBNORMAL)
        if SUBNORMAL:
            x_sum = x_sum * TO_DOMAIN
        acc += s.to(tl.float32) * (dot - z.to(tl.float32) * x_sum[:, None])
    y = tl.sum(acc, axis=0)
    if SUBNORMAL:
        y = y * UNSCALE
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty),
             mask=n_mask)


@dataclass(frozen=True)
class W4TmaConfig:
    """Launch shape: output columns per program (a power of two from 8), word rows per tile,
    warps, and the shared-memory pipeline depth (tiles in flight); the nibble decoding as
    :class:`.w4a16_gemv.W4GemvConfig`'s; ``prefetch_l2``: before the PDL wait, each program
    asks the L2 for the word rows of its first ``num_stages`` tiles (a line a row), which the
    pipeline's first TMA loads, issued after the wait, then find there."""

    block_n: int
    block_kw: int
    num_warps: int
    num_stages: int
    nibble: str = NIBBLE_SUBNORMAL
    prefetch_l2: bool = False


def fits(n: int, k: int, group: int, block_kw: int) -> bool:
    """Whether a ``[K, N]`` 4-bit weight of ``group`` can take this kernel at ``block_kw``
    word rows a tile (see the module's needs)."""
    rows = rows_per_thread(group // 8, block_kw)
    return (TensorDescriptor is not None and n % 4 == 0 and triton.cdiv(k, 8) % rows == 0
            and group % 8 == 0)


def w4a16_gemv_tma(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
                   scales: torch.Tensor, group: int, config: W4TmaConfig,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`.w4a16_gemv.w4a16_gemv` (same operands, result and errors), through the TMA
    pipeline at ``config``. Raises ``ValueError`` where :func:`fits` is False or a shape
    does not match."""
    m, k = x.shape
    n = qweight.shape[1]
    if (qweight.shape[0] != triton.cdiv(k, 8) or not qweight.is_contiguous()
            or x.stride(1) != 1 or zeros.shape != scales.shape or zeros.shape[1] != n
            or zeros.shape[0] * group < k or zeros.stride(1) != 1 or scales.stride(1) != 1
            or not fits(n, k, group, config.block_kw)):
        raise ValueError(f"w4a16_gemv_tma: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"zeros/scales {tuple(zeros.shape)} with group {group} do not fit")
    if config.nibble not in (NIBBLE_SUBNORMAL, NIBBLE_EXPONENT):
        raise ValueError(f"w4a16_gemv_tma: unknown nibble decoding {config.nibble!r}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    rows = rows_per_thread(group // 8, config.block_kw)
    kw = qweight.shape[0]
    desc = TensorDescriptor(qweight, [kw // rows, rows, n], [rows * n, n, 1],
                            [config.block_kw // rows, 1, config.block_n])
    _w4a16_gemv_tma_kernel[(m, triton.cdiv(n, config.block_n))](
        x, desc, qweight, zeros, scales, bias if bias is not None else y, y, n, k,
        x.stride(0), zeros.stride(0), scales.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_KW=config.block_kw,
        ROWS=rows, GROUP_W=group // 8, SUBNORMAL=config.nibble == NIBBLE_SUBNORMAL,
        NUM_STAGES=config.num_stages,
        PREFETCH_ROWS=(triton.next_power_of_2(min(config.num_stages * config.block_kw, kw))
                       if config.prefetch_l2 else 0),
        EVEN=k % (8 * config.block_kw) == 0 and n % config.block_n == 0, num_warps=config.num_warps, **pdl_args(x.device))
    return y
