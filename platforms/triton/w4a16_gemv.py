"""Triton GEMV for 4-bit weights (AWQ / GPTQ after repacking) at decode sizes: ``y = x @ W``
with the nibbles unpacked in registers and the packed words read once.

Layout (:mod:`.w4a16_gemm`, made by :mod:`.w4a16_pack`): ``qweight [ceil(K/8), N]`` int32,
nibble ``j`` of word ``[w, n]`` = ``q[8w + j, n]``; ``zeros``, ``scales`` ``[G, N]`` fp16;
``W[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]``. A program owns
``BLOCK_N`` columns and walks all of K, ``BLOCK_KW`` word rows a step; no split-K. A step's
tile is ``[T, BLOCK_N / 8, 8]`` words, ``T = BLOCK_KW / ROWS``; at the rule's shapes
(``T * BLOCK_N = 8 * threads``) a thread holds 8 adjacent columns (two 16-byte loads a word
row) of ``ROWS = 4`` consecutive word rows. Those rows lie in one group (``ROWS`` divides the
group's word rows), so the thread sums their 32 products a column before the zero point and
scale apply once, ``s * (sum q x - z * sum x)``; a word row's eight ``x`` come in one load
and serve the thread's 8 columns.

At the copy rate the H200's issue slots allow about 3.9 instructions a nibble, so the
per-nibble work is one integer op and one FMA (``NIBBLE_SUBNORMAL``). Nibble ``j <= 5``
masked in place, ``w & (15 << 4j)``, is below ``2**24``, where the fp32 reading of a bit
pattern ``b`` is ``b * 2**-149`` (exponent fields 0 and 1 share that scale): exactly
``q_j 2**(4j - 149)``. The top byte shifted down, ``w >> 24`` (logical), reads as
``(q6 + 16 q7) 2**-149`` and ``w >> 28`` as ``q7 2**-149``, and ``q6 x6 + q7 x7 =
(q6 + 16 q7) x6 + q7 (x7 - 16 x6)``: eight integer ops a word. ``x_j`` is pre-scaled by
``2**(84 - 4j)`` (``x6`` and ``x7 - 16 x6`` by ``2**84``) once a word row, so every product
lands at ``q x 2**-65`` in the normal range, and the result is scaled back once.
Contract: ``|x| < 2**39``; NaN and inf propagate. ``x7 - 16 x6`` is one fp32 rounding, exact
for bf16 ``x`` within ``2**16`` of each other. GPUs multiply subnormals at full rate; Triton
does not flush them in plain arithmetic. ``NIBBLE_EXPONENT``, the fallback where
:func:`keeps_subnormals` finds them flushed, or-s each masked nibble under the exponent of
``2**23`` and subtracts it: two float ops a nibble. SASS a nibble in the sm_90 main loop
(``benchmarks/kernel_sass.py``, bf16 x, group 128, the rule's shapes, Triton 3.9): 2.75-2.78,
the exponent decoding 5.0; 3.88 before the per-thread rows (zero point and scale applied per
word, ``x`` per 4 columns). Reading bf16 ``x`` as int32 pairs and scaling it by an integer
add to the exponent field took 2.64, but turned NaN, inf and ``|x| >= 2**39`` into about 0
silently, so ``x`` is converted and multiplied instead.
No int-to-float conversion either way, which would bound the kernel below the copy rate.
The group size is a compile-time constant.

Grid: ``(rows, cdiv(N, BLOCK_N))``, rows fastest (their programs share the weight slice
through L2). The first tile's weights load before the PDL wait (they are parameters); the
``kw % BLOCK_KW`` word rows past the last whole tile go one a thread, masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import split8
from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous
from heteroserve.platforms.triton.w4a16_pack import random_packed, unpack_rows

#: at most this many rows go through the GEMV (more: the dequant-GEMM)
W4_GEMV_MAX_ROWS = 4
#: nibble decodings (:class:`W4GemvConfig` ``nibble``; see the module)
NIBBLE_SUBNORMAL, NIBBLE_EXPONENT = "subnormal", "exponent"
_TWO_23 = tl.constexpr(8388608.0)
X_EXP = tl.constexpr(84)  # x_j is pre-scaled by 2**(84 - 4j): products land at 2**-65
TO_DOMAIN = tl.constexpr(2.0 ** -65)  # 2**(X_EXP - 149)
UNSCALE = tl.constexpr(2.0 ** 65)


@triton.jit
def masked_nibble(w, SHIFT: tl.constexpr):
    """Nibble ``SHIFT / 4`` of ``w`` masked in place, read as fp32: ``q * 2**(SHIFT - 149)``
    for ``SHIFT <= 20`` (the bits stay below ``2**24``, where the fp32 value of a bit pattern
    ``b`` is ``b * 2**-149``)."""
    return (w & (15 << SHIFT)).to(tl.float32, bitcast=True)


@triton.jit
def exponent_nibble(src, SHIFT: tl.constexpr):
    """The nibble at bits ``SHIFT..SHIFT+3`` (``SHIFT <= 16``) of ``src`` as fp32
    ``q * 2**SHIFT``: or-ed under the exponent of ``2**23``, which is then subtracted."""
    bits = (src & (15 << SHIFT)) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - _TWO_23


@triton.jit
def nibble_factors(cols, SUBNORMAL: tl.constexpr):
    """One word row's eight ``x`` columns ``cols`` (fp32, any one shape ``S``) -> the factors
    of the row's nibbles, each ``S + [1]`` (broadcast over a thread's columns), and ``sum_j
    x_j`` of shape ``S``. Subnormal decoding: ``x_j 2**(84 - 4j)`` for ``j < 6``, ``x_6
    2**84``, ``(x_7 - 16 x_6) 2**84``; exponent decoding: ``x_j 16**-s`` with ``s`` the
    nibble's shift in its source word."""
    x0, x1, x2, x3, x4, x5, x6, x7 = cols
    total = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    if SUBNORMAL:
        factors = (x0 * 2.0 ** X_EXP, x1 * 2.0 ** (X_EXP - 4), x2 * 2.0 ** (X_EXP - 8),
                   x3 * 2.0 ** (X_EXP - 12), x4 * 2.0 ** (X_EXP - 16),
                   x5 * 2.0 ** (X_EXP - 20), x6 * 2.0 ** X_EXP,
                   (x7 - 16.0 * x6) * 2.0 ** X_EXP)
    else:
        factors = (x0, x1 * 0.0625, x2 * 0.0625 ** 2, x3 * 0.0625 ** 3, x4 * 0.0625 ** 4, x5,
                   x6 * 0.0625, x7 * 0.0625 ** 2)
    return (tl.expand_dims(factors[0], -1), tl.expand_dims(factors[1], -1),
            tl.expand_dims(factors[2], -1), tl.expand_dims(factors[3], -1),
            tl.expand_dims(factors[4], -1), tl.expand_dims(factors[5], -1),
            tl.expand_dims(factors[6], -1), tl.expand_dims(factors[7], -1)), total


@triton.jit
def _prescaled(x, T: tl.constexpr, V: tl.constexpr, SUBNORMAL: tl.constexpr):
    """``x [T, V, 8]`` fp32 (one word row's eight, the same along ``V``) ->
    :func:`nibble_factors` (each ``[T, V, 1]``, the sum ``[T, V]``)."""
    return nibble_factors(split8(tl.reshape(x, [T, V, 2, 2, 2])), SUBNORMAL)


@triton.jit
def row_dot(w, xs, dot, SUBNORMAL: tl.constexpr):
    """``dot + sum_j q_j x_j`` (times ``2**-65`` with the subnormal decoding) for one word
    row: ``w`` int32 words (any tile shape), ``xs`` the eight factors of
    :func:`nibble_factors`, broadcast against ``w``."""
    if SUBNORMAL:
        dot += masked_nibble(w, 0) * xs[0]
        dot += masked_nibble(w, 4) * xs[1]
        dot += masked_nibble(w, 8) * xs[2]
        dot += masked_nibble(w, 12) * xs[3]
        dot += masked_nibble(w, 16) * xs[4]
        dot += masked_nibble(w, 20) * xs[5]
        # the top byte shifted down, q6 + 16 q7, times x_6; q7 times x_7 - 16 x_6
        u = w.to(tl.uint32, bitcast=True)
        dot += (u >> 24).to(tl.float32, bitcast=True) * xs[6]
        dot += (u >> 28).to(tl.float32, bitcast=True) * xs[7]
    else:
        high = w >> 20
        dot += exponent_nibble(w, 0) * xs[0]
        dot += exponent_nibble(w, 4) * xs[1]
        dot += exponent_nibble(w, 8) * xs[2]
        dot += exponent_nibble(w, 12) * xs[3]
        dot += exponent_nibble(w, 16) * xs[4]
        dot += exponent_nibble(high, 0) * xs[5]
        dot += exponent_nibble(high, 4) * xs[6]
        dot += exponent_nibble(high, 8) * xs[7]
    return dot


@triton.jit
def _tile_loads(qw_ptr, x_row, z_ptr, s_ptr, w0, offs_t, zs_t, offs_n, n_mask, kw, K,
                stride_qk, stride_zg, stride_sg, MASK_N: tl.constexpr, MASK_K: tl.constexpr,
                ROWS: tl.constexpr, GROUP_W: tl.constexpr, USE_PDL: tl.constexpr,
                WAIT: tl.constexpr, T: tl.constexpr, V: tl.constexpr, ALIGNED: tl.constexpr):
    """Everything the tile at word rows ``w0 + offs_t + m`` (``m < ROWS``, each run in one
    group) reads: ``(words, z, s, xs)``, ``ROWS`` word tensors ``[T, V, 8]`` int32, the
    group's zero points and scales ``[T, V, 8]`` fp16 and ``ROWS`` ``x`` tensors ``[T, V,
    8]``. The weights, zero points and scales load first, then the PDL wait where ``WAIT``,
    then ``x``. ``MASK_K``: rows from ``kw`` on read as zero. ``zs_t``: the group rows at
    ``w0 = 0``."""
    ww = (w0 + offs_t)[:, None, None]  # [T, 1, 1]
    q_ptrs = qw_ptr + ww.to(tl.int64) * stride_qk + offs_n[None, :, :]
    words = ()
    for m in tl.static_range(ROWS):
        if MASK_K:
            mask = ww + m < kw
            if MASK_N:
                mask = mask & n_mask[None, :, :]
            words = words + (tl.load(q_ptrs + m * stride_qk, mask=mask, other=0,
                                     eviction_policy="evict_first"),)
        elif MASK_N:
            words = words + (tl.load(q_ptrs + m * stride_qk, mask=n_mask[None, :, :],
                                     other=0, eviction_policy="evict_first"),)
        else:
            words = words + (tl.load(q_ptrs + m * stride_qk, eviction_policy="evict_first"),)
    if ALIGNED:  # w0 starts a group
        g = w0 // GROUP_W + zs_t
    else:
        g = ww // GROUP_W
    z_ptrs = z_ptr + g * stride_zg + offs_n[None, :, :]
    s_ptrs = s_ptr + g * stride_sg + offs_n[None, :, :]
    if MASK_K or MASK_N:
        zs_mask = (ww < kw) & n_mask[None, :, :]
        z = tl.load(z_ptrs, mask=zs_mask, other=0.0)
        s = tl.load(s_ptrs, mask=zs_mask, other=0.0)
    else:
        z = tl.load(z_ptrs)
        s = tl.load(s_ptrs)
    if WAIT:
        wait_for_previous(USE_PDL)
    xs = ()
    for m in tl.static_range(ROWS):
        kk = (offs_t[:, None, None] + m) * 8 + tl.arange(0, 8)[None, None, :] + \
            tl.zeros([T, V, 8], tl.int32)
        if MASK_K:
            xs = xs + (tl.load(x_row + w0 * 8 + kk, mask=kk < K - w0 * 8, other=0.0),)
        else:
            xs = xs + (tl.load(x_row + w0 * 8 + kk),)
    return words, z, s, xs


@triton.jit
def _tile_dot(tile, acc, ROWS: tl.constexpr, SUBNORMAL: tl.constexpr, T: tl.constexpr,
              V: tl.constexpr):
    """``acc + s * (sum_k q x - z * sum_k x)`` over a tile of :func:`_tile_loads`."""
    words, z, s, xs = tile
    dot = tl.zeros([T, V, 8], dtype=tl.float32)
    x_sum = tl.zeros([T, V], dtype=tl.float32)
    for m in tl.static_range(ROWS):
        factors, total = _prescaled(xs[m].to(tl.float32), T, V, SUBNORMAL)
        x_sum += total
        dot = row_dot(words[m], factors, dot, SUBNORMAL)
    if SUBNORMAL:
        x_sum = x_sum * TO_DOMAIN
    return acc + s.to(tl.float32) * (dot - z.to(tl.float32) * x_sum[:, :, None])


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, z_ptr, s_ptr, bias_ptr, y_ptr, N, K,
    stride_xm, stride_qk, stride_zg, stride_sg, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, ROWS: tl.constexpr, GROUP_W: tl.constexpr,
    SUBNORMAL: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr,
):
    """See the module. ``PREFETCH``: a whole tile's loads are issued before the previous
    tile's products (twice the words in registers); without it a tile is loaded and used in
    one iteration, which keeps its registers to one tile. ``EVEN``: ``N`` a multiple of
    ``BLOCK_N``; ``ROWS`` divides ``BLOCK_KW`` and ``GROUP_W`` (the group's word rows)."""
    T: tl.constexpr = BLOCK_KW // ROWS
    V: tl.constexpr = BLOCK_N // 8
    MASK_N: tl.constexpr = not EVEN
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + (tl.arange(0, V) * 8)[:, None] + tl.arange(0, 8)[None, :]
    n_mask = offs_n < N
    offs_t = tl.arange(0, T) * ROWS
    zs_t = (offs_t // GROUP_W)[:, None, None]
    kw = tl.cdiv(K, 8)
    full = kw // BLOCK_KW  # unmasked word tiles
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros([T, V, 8], dtype=tl.float32)
    ALIGNED: tl.constexpr = BLOCK_KW % GROUP_W == 0
    done = full * BLOCK_KW
    if full > 0:
        tile = _tile_loads(qw_ptr, x_row, z_ptr, s_ptr, tl.full([], 0, tl.int32), offs_t, zs_t,
                           offs_n, n_mask, kw, K, stride_qk, stride_zg, stride_sg, MASK_N,
                           False, ROWS, GROUP_W, USE_PDL, True, T, V, ALIGNED)
        if PREFETCH:  # the next tile's loads in flight while this one's products run
            for w0 in range(BLOCK_KW, done, BLOCK_KW):
                ahead = _tile_loads(qw_ptr, x_row, z_ptr, s_ptr, w0, offs_t, zs_t, offs_n,
                                    n_mask, kw, K, stride_qk, stride_zg, stride_sg, MASK_N,
                                    False, ROWS, GROUP_W, USE_PDL, False, T, V, ALIGNED)
                acc = _tile_dot(tile, acc, ROWS, SUBNORMAL, T, V)
                tile = ahead
            acc = _tile_dot(tile, acc, ROWS, SUBNORMAL, T, V)
        else:
            acc = _tile_dot(tile, acc, ROWS, SUBNORMAL, T, V)
            for w0 in range(BLOCK_KW, done, BLOCK_KW):
                acc = _tile_dot(_tile_loads(qw_ptr, x_row, z_ptr, s_ptr, w0, offs_t, zs_t,
                                            offs_n, n_mask, kw, K, stride_qk, stride_zg,
                                            stride_sg, MASK_N, False, ROWS, GROUP_W, USE_PDL,
                                            False, T, V, ALIGNED),
                                acc, ROWS, SUBNORMAL, T, V)
    else:
        wait_for_previous(USE_PDL)
    # the last kw % BLOCK_KW rows: one a thread, T at a time
    for w0 in range(done, kw, T):
        acc = _tile_dot(_tile_loads(qw_ptr, x_row, z_ptr, s_ptr, w0, tl.arange(0, T), zs_t,
                                    offs_n, n_mask, kw, K, stride_qk, stride_zg, stride_sg,
                                    MASK_N, True, 1, GROUP_W, USE_PDL, False, T, V, False),
                        acc, 1, SUBNORMAL, T, V)
    y = tl.sum(tl.reshape(acc, [T, BLOCK_N]), axis=0)
    if SUBNORMAL:
        y = y * UNSCALE
    offs_y = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_y, mask=offs_y < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs_y, y.to(y_ptr.dtype.element_ty),
             mask=offs_y < N)


@dataclass(frozen=True)
class W4GemvConfig:
    """Launch shape: output columns per program (a power of two from 8), word rows (8 K-rows
    each) per step, warps, pipeline stages; and the nibble decoding (``NIBBLE_SUBNORMAL`` or
    ``NIBBLE_EXPONENT``), and whether the next tile's loads are issued before a tile's
    products (Triton's pipeliner leaves this loop's loads alone at any ``num_stages``).
    ``block_n * block_kw = 1024 * num_warps`` gives each thread 8 columns of 4 word rows;
    other shapes are correct too."""

    block_n: int
    block_kw: int
    num_warps: int
    num_stages: int
    nibble: str = NIBBLE_SUBNORMAL
    prefetch: bool = False


def choose_w4_config(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    """32 columns a program where that still leaves four programs per multiprocessor, else
    16 (8 for narrow layers), as the rule before (H100 sweep, 2026-12-05); 16 KiB tiles of
    four warps, ``block_kw = 1024 * warps / block_n``, so that each thread holds 8 columns of
    4 word rows (32 words a step). Where the tile's word rows do not divide ``K / 8``, the
    tile halves with its warps, down to 4 KiB, until they do, so that no word row is left to
    the slower one-row tail steps. On an H100 (``benchmarks/results/
    h100-20261206-1619-quant_gemv_w4_sweep.txt``) the four Llama-3.1-8B layers take 54.2 us
    at this rule and 50.7 us at the sweep's best shapes (32 KiB tiles at qkv/o, 8 columns of
    8 warps at down); not yet swept on an H200, nor timed end to end at other shapes. The
    exponent decoding where :func:`keeps_subnormals` found the device flushing subnormals."""
    nibble = nibble_decoding(device)
    if device.type == "cpu":  # the interpreter: small tiles exercise the masks
        return W4GemvConfig(16, 8, 1, 1, nibble)
    sms = multiprocessors(device)
    block_n = 32
    while block_n > 8 and rows * triton.cdiv(n, block_n) < (4 if block_n == 32 else 1) * sms:
        block_n //= 2
    while triton.cdiv(n, block_n) > 65535:  # CUDA's limit on the second grid dimension
        block_n *= 2
    kw = triton.cdiv(k, 8)
    block_kw = min(4096 // block_n, triton.next_power_of_2(kw))
    while kw % block_kw and block_kw * block_n > 1024 and block_kw > 4:
        block_kw //= 2
    warps = max(1, min(4, block_kw * block_n // 1024))
    return W4GemvConfig(block_n, block_kw, warps, 1, nibble)


def nibble_decoding(device: torch.device) -> str:
    """``NIBBLE_EXPONENT`` where :func:`keeps_subnormals` found ``device`` flushing fp32
    subnormals, else ``NIBBLE_SUBNORMAL`` (also before the device is checked)."""
    return (NIBBLE_SUBNORMAL if _KEEPS_SUBNORMALS.get((device.type, device.index), True)
            else NIBBLE_EXPONENT)


def rows_per_thread(group_w: int, block_kw: int) -> int:
    """Word rows a thread sums before its group's zero point and scale apply: the largest of
    4, 2, 1 dividing both the group's word rows and the tile's."""
    return next(r for r in (4, 2, 1) if group_w % r == 0 and block_kw % r == 0)


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
               scales: torch.Tensor, group: int, bias: torch.Tensor | None = None,
               config: W4GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16/fp32, last dim contiguous; ``M <= W4_GEMV_MAX_ROWS`` is where
    it pays) times the packed 4-bit ``W [K, N]`` (+ ``bias [N]``) -> ``[M, N]`` in
    ``x.dtype``, fp32 accumulation. ``group``: K-rows per zero/scale row, a multiple of 8
    (``g_idx`` layouts go to the GEMM; each group size compiles its own kernel). ``x`` must
    stay below ``2**39`` in magnitude (NaN and inf propagate; see the module); outputs
    below ``2**-61`` lose relative precision (the sum runs scaled by ``2**-65``). Raises ``ValueError`` on mismatched
    shapes, an unknown ``config.nibble`` or a ``config.block_n`` that is not a power of two
    from 8."""
    m, k = x.shape
    n = qweight.shape[1]
    groups = zeros.shape[0]
    if (qweight.shape[0] != triton.cdiv(k, 8) or qweight.stride(1) != 1 or x.stride(1) != 1
            or group % 8 or groups * group < k or zeros.shape != scales.shape
            or zeros.shape[1] != n or zeros.stride(1) != 1 or scales.stride(1) != 1):
        raise ValueError(f"w4a16_gemv: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"zeros/scales {tuple(zeros.shape)} with group {group} do not fit")
    cfg = config or choose_w4_config(n, k, m, x.device)
    if cfg.nibble not in (NIBBLE_SUBNORMAL, NIBBLE_EXPONENT):
        raise ValueError(f"w4a16_gemv: unknown nibble decoding {cfg.nibble!r}")
    if cfg.block_n < 8 or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"w4a16_gemv: block_n {cfg.block_n} is not a power of two from 8")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    subnormal = cfg.nibble == NIBBLE_SUBNORMAL
    _w4a16_gemv_kernel[(m, triton.cdiv(n, cfg.block_n))](
        x, qweight, zeros, scales, bias if bias is not None else y, y, n, k,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN=n % cfg.block_n == 0, BLOCK_N=cfg.block_n,
        BLOCK_KW=cfg.block_kw, ROWS=rows_per_thread(group // 8, cfg.block_kw),
        GROUP_W=group // 8, SUBNORMAL=subnormal, PREFETCH=cfg.prefetch, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_args(x.device))
    return y


#: per (device type, index): whether the compiled GEMV keeps fp32 subnormals
_KEEPS_SUBNORMALS: dict[tuple[str, int | None], bool] = {}


def keeps_subnormals(device: torch.device,
                     gemv: Callable[..., torch.Tensor] = w4a16_gemv) -> bool:
    """Whether ``device``'s compiled kernel keeps fp32 subnormals, so that the subnormal
    decoding is exact. Checked once per device: a ``1 x 256`` by ``256 x 32`` product must
    match the dequantized weight's fp64 product within 1e-5 (a backend that flushes
    subnormals to zero drops nibbles 0..4 and misses by far more; kept on NVIDIA Hopper, not
    yet run on ROCm). Until a device is checked, :func:`choose_w4_config` assumes it keeps
    them. Call it outside graph capture: the linear methods do, when they process a layer's
    weights."""
    key = (device.type, device.index)
    if key not in _KEEPS_SUBNORMALS:
        gen = torch.Generator().manual_seed(0)
        k, n, group = 256, 32, 128
        words, zeros, scales = random_packed(gen, k, n, group)
        x = torch.randn(1, k, generator=gen)
        out = gemv(*(t.to(device) for t in (x, words, zeros, scales)), group,
                   config=W4GemvConfig(16, 16, 4, 1, NIBBLE_SUBNORMAL)).double().cpu()
        g = torch.arange(k) // group
        ref = x.double() @ ((unpack_rows(words).double() - zeros.double()[g])
                            * scales.double()[g])
        _KEEPS_SUBNORMALS[key] = ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    return _KEEPS_SUBNORMALS[key]
