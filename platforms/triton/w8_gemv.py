"""Triton GEMV for the W8A8 schemes at decode sizes (a few rows): ``y = quant(x) @ W^T``
with 1-byte weights (fp8 e4m3 or int8) read once at the copy ceiling.

Honest to the W8A8 contract (``core/kernels/linear.py``): the activation is quantized
*inside* the kernel as :func:`~.quant.quantize_rows` would quantize it (same scale
``max(amax / qmax, 1e-12)``, same clamp, round-to-nearest-even onto the fp8 or int8 grid; it
multiplies by ``1 / scale`` where that kernel divides, and neither is correctly rounded on
the GPU (Triton's fp32 division is approximate); for power-of-two scales both are exact), so
the result is the scheme's result without a separate quantization launch and without the
activation round trip. The quantized value goes on in fp32 registers (it is exact there).
e4m3fn weights on NVIDIA GPUs from compute capability 8.9 round it by the hardware's
saturating conversion ``cvt.rn.satfinite`` (two values an instruction); elsewhere, and in the
Triton interpreter, whose fp8 cast mis-rounds values that carry into the next binade, integer
arithmetic on the fp32 bits (:func:`round_fp8`) gives the same values. int8 weights become
fp32 by an integer add under the exponent of ``1.5 * 2**23`` and one subtraction (exact), not by the
int-to-float conversion, whose throughput is below one byte per lane per cycle.

Activation granularity (``ACT``): ``ACT_TENSOR`` (one scale over all rows: fp8 per-tensor),
``ACT_ROW`` (per token: fp8 per-channel, int8), ``ACT_GROUP`` (per token and 128 columns: fp8
block). The first two need the amax before the first product, so each program makes one
pre-pass over its row(s) (``K`` elements from L2, small next to its weight slice, read in
steps of up to 4096 so that the pass costs few dependent round trips). Weight
scale (``WS``): ``WS_TENSOR`` (one fp32), ``WS_CHANNEL`` (one per output row), ``WS_BLOCK``
(``[ceil(N/128), ceil(K/128)]``; a program's ``BLOCK_N`` rows lie in one 128-row block).

Grid: ``(rows, cdiv(N, BLOCK_N))`` with the row index fastest, so the programs of the rows
that read the same weight slice run together and share it through L2. Weights and scales are
the layer's loaded parameters (no kernel writes them): the first weight tile loads before the
PDL wait (:mod:`.pdl`). Each thread's 16 products of one vector load join the fp32
accumulator ``[BLOCK_N, BLOCK_K / 16]`` one after another (:func:`~.jit_math.fold2_into`: one
fma a weight), so the accumulator does not grow with the tile: 16 KiB tiles fit in under 100
registers a thread, and enough programs share a multiprocessor to keep the loads the copy
rate needs in flight. Compiled for sm_90 (``benchmarks/kernel_sass.py``), the main loop
issues 4.3 instructions a weight at the fp8-block rule's shape (5.7 with a tree of products
and the integer rounding), against 7.8 an H200 can issue a byte at its copy rate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.gemv import weight_tile
from heteroserve.platforms.triton.jit_math import fold2_into
from heteroserve.platforms.triton.pdl import pdl_args, prefetch_to_l2, wait_for_previous
from heteroserve.platforms.triton.quant import MIN_SCALE

ACT_TENSOR, ACT_ROW, ACT_GROUP = 0, 1, 2
WS_TENSOR, WS_CHANNEL, WS_BLOCK = 0, 1, 2
#: at most this many rows go through the GEMV (more: the scheme's GEMM)
W8_GEMV_MAX_ROWS = 4
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (the output tiles)
#: weights a thread loads in one 16-byte vector: each one's products are summed in registers
#: before they join the accumulator, which is therefore ``[BLOCK_N, BLOCK_K // _FOLD]``
_FOLD = 16
#: 128-byte lines a weight row asks the L2 for past its first tile (``prefetch_l2``)
PREFETCH_MAX_LINES = 32


@triton.jit
def round_fp8(v, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr):
    """fp32 ``v`` (``|v| <=`` the fp8 max) rounded to nearest-even on the e4m3 grid (3
    mantissa bits, normals from ``MIN_NORMAL``, subnormal step ``MIN_NORMAL / 8``), as fp32.
    Normals: round the fp32 bits at mantissa bit 20 (ties to even; a carry moves into the
    exponent). Subnormals: ``(v + SUB_MAGIC) - SUB_MAGIC`` with ``SUB_MAGIC = 1.5 * 2**23 *
    step``."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    sub = (v + SUB_MAGIC) - SUB_MAGIC
    return tl.where(tl.abs(v) < MIN_NORMAL, sub, normal)


@triton.jit
def _quantize(a, inv_scale, qmax, IS_INT: tl.constexpr, MIN_NORMAL: tl.constexpr,
              SUB_MAGIC: tl.constexpr, CAST_FP8: tl.constexpr):
    """``a * inv_scale`` clamped to ``+-qmax`` and rounded onto the weight's grid, as fp32.
    ``CAST_FP8``: by the hardware's saturating e4m3 conversion (two values an instruction),
    which rounds and clamps as :func:`round_fp8` and the clamp do."""
    v = a * inv_scale
    if CAST_FP8:
        return v.to(tl.float8e4nv).to(tl.float32)
    v = tl.minimum(tl.maximum(v, -qmax), qmax)
    if IS_INT:
        return (v + _ROUND_MAGIC) - _ROUND_MAGIC
    else:
        return round_fp8(v, MIN_NORMAL, SUB_MAGIC)


@triton.jit
def _load_x(x_row, kk, k_mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(x_row + kk, eviction_policy="evict_last").to(tl.float32)
    else:
        return tl.load(x_row + kk, mask=k_mask, other=0.0,
                       eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _broadcast_groups(v, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """``[BLOCK_K // GROUP]`` -> ``[BLOCK_K]``, each value repeated over its group."""
    return tl.reshape(tl.broadcast_to(v[:, None], [BLOCK_K // GROUP, GROUP]), [BLOCK_K])


@triton.jit
def _tile(w, x_row, ws_row, k0, offs_k, K, scale, qmax, min_scale, acc, ACT: tl.constexpr,
          WS: tl.constexpr, IS_INT: tl.constexpr, MIN_NORMAL: tl.constexpr,
          SUB_MAGIC: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, GROUP: tl.constexpr, FOLD: tl.constexpr,
          CAST_FP8: tl.constexpr):
    """``acc + w * quant(x[k0:k0+BLOCK_K]) * scales``: one weight tile's products (see the
    module)."""
    kk = k0 + offs_k
    k_mask = kk < K
    a = _load_x(x_row, kk, k_mask, EVEN)
    if ACT == 2:  # per 128 columns: BLOCK_K holds whole groups
        grouped = tl.reshape(tl.abs(a), [BLOCK_K // GROUP, GROUP])
        g_scale = tl.maximum(tl.max(grouped, axis=1) / qmax, min_scale)
        g_inv = _broadcast_groups(1.0 / g_scale, BLOCK_K, GROUP)
        if WS == 2:  # the weight's block scale joins the activation's, once per group
            groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
            g_scale *= tl.load(ws_row + groups, mask=groups < tl.cdiv(K, GROUP), other=0.0)
        a = _quantize(a, g_inv, qmax, IS_INT, MIN_NORMAL, SUB_MAGIC, CAST_FP8) * \
            _broadcast_groups(g_scale, BLOCK_K, GROUP)
    else:
        a = _quantize(a, 1.0 / scale, qmax, IS_INT, MIN_NORMAL, SUB_MAGIC, CAST_FP8)
        if WS == 2:
            a = a * tl.load(ws_row + kk // GROUP, mask=k_mask, other=0.0)
    if IS_INT:  # 1.5 * 2**23 + w exactly: an integer add instead of a slow int-to-float
        wf = (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - _ROUND_MAGIC
    else:
        wf = w.to(tl.float32)
    return fold2_into(acc, wf * a[None, :], BLOCK_N, BLOCK_K, FOLD)


@triton.jit
def _w8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_wsn, stride_ym, qmax, min_scale,
    ACT: tl.constexpr, WS: tl.constexpr, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
    MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    AMAX_BLOCK: tl.constexpr, USE_PDL: tl.constexpr, FOLD: tl.constexpr,
    CAST_FP8: tl.constexpr, PREFETCH_LINES: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    w = weight_tile(w_ptrs, n_mask, offs_k < K, EVEN)  # a parameter: may load before the wait
    if PREFETCH_LINES > 0:  # the next tiles' 128-byte lines of each row, into the L2
        cols = tl.minimum(BLOCK_K + tl.arange(0, PREFETCH_LINES) * 128, K - 1)
        rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
        prefetch_to_l2(w_ptr + rows_n[:, None] * stride_wn + cols[None, :], USE_PDL)
    wait_for_previous(USE_PDL)
    x_row = x_ptr + row.to(tl.int64) * stride_xm

    scale = 1.0
    if ACT != 2:  # one scale per row or per tensor: the amax first
        amax = tl.zeros([AMAX_BLOCK], dtype=tl.float32)
        offs_a = tl.arange(0, AMAX_BLOCK)
        if ACT == 0:
            first_row = 0
            last_row = M
        else:
            first_row = row
            last_row = row + 1
        for r in range(first_row, last_row):
            for k0 in range(0, K, AMAX_BLOCK):  # wide steps: few dependent L2 round trips
                kk = k0 + offs_a
                a = _load_x(x_ptr + r * stride_xm, kk, kk < K, False)  # r * K: small
                amax = tl.maximum(amax, tl.abs(a))
        scale = tl.maximum(tl.max(amax, axis=0) / qmax, min_scale)

    if WS == 2:
        ws_row = ws_ptr + ((pid_n * BLOCK_N) // GROUP) * stride_wsn
    else:
        ws_row = ws_ptr
    acc = _tile(w, x_row, ws_row, 0, offs_k, K, scale, qmax, min_scale,
                tl.zeros([BLOCK_N, BLOCK_K // FOLD], dtype=tl.float32), ACT, WS, IS_INT,
                MIN_NORMAL, SUB_MAGIC, EVEN, BLOCK_N, BLOCK_K, GROUP, FOLD, CAST_FP8)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w_ptrs += BLOCK_K
        w = weight_tile(w_ptrs, n_mask, (k0 + offs_k) < K, EVEN)
        acc = _tile(w, x_row, ws_row, k0, offs_k, K, scale, qmax, min_scale, acc, ACT, WS,
                    IS_INT, MIN_NORMAL, SUB_MAGIC, EVEN, BLOCK_N, BLOCK_K, GROUP, FOLD,
                    CAST_FP8)

    y = tl.sum(acc, axis=1)
    if ACT != 2:
        y = y * scale
    if WS == 0:
        y = y * tl.load(ws_ptr)
    elif WS == 1:
        y = y * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty),
             mask=n_mask)


@dataclass(frozen=True)
class W8GemvConfig:
    """Launch shape: output rows per program, K per step (a multiple of 128 for block
    scales), warps, pipeline stages; ``prefetch_l2``: with PDL, before the wait each program
    also asks the L2 for the lines of its rows' next tiles (up to :data:`PREFETCH_MAX_LINES`
    a row) while its first tile loads into registers."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    prefetch_l2: bool = False


def choose_w8_config(n: int, k: int, rows: int, device: torch.device,
                     act: int = ACT_GROUP) -> W8GemvConfig:
    """The launch shape for an ``N x K`` fp8/int8 weight and activation granularity ``act``
    (:func:`w8_launch_rule`; small tiles under the interpreter)."""
    if device.type == "cpu":  # the interpreter: small tiles exercise the masks
        return W8GemvConfig(16, 128, 1, 1)
    return w8_launch_rule(n, k, rows, multiprocessors(device), act)


def w8_launch_rule(n: int, k: int, rows: int, sms: int, act: int) -> W8GemvConfig:
    """:func:`choose_w8_config`'s shape on a GPU of ``sms`` multiprocessors: eight output
    rows a program (halved while fewer than two programs per multiprocessor), 2 KiB of each
    weight row a step (16 KiB tiles), eight warps for ``ACT_GROUP`` (fp8 block) and four for
    ``ACT_ROW`` / ``ACT_TENSOR``.

    Why: the fastest uniform shape of the 24-shape sweep at Llama-3.1-8B's four layers once
    the accumulator shrank to ``[BLOCK_N, BLOCK_K / 16]`` (``benchmarks/quant_gemv_sweep.py
    --sweep --schemes fp8_per_tensor,fp8_block``, H100, 2026-12-06,
    ``results/h100-20261206-0847-quant_gemv_w8.json``): 75.1 us (fp8 block) and 79.5 us (per
    tensor) for the four layers, against 81.2 / 87.7 us for the previous kernel at its own
    launch rule. Before, the ``[BLOCK_N, BLOCK_K]`` fp32 accumulator took 239 registers a
    thread at 16 x 1024, two programs a multiprocessor, too few loads in flight.

    The H200's sweep (``results/h200-20261206-1020-quant_gemv_w8.json``, the kernel before
    the fma chain) times 16 rows a program faster in isolation (the four layers 58.2 against
    65.0 us, fp8 block), but in the decode graph it is not: on an H100 it ran 3-4 points of
    the roofline slower (``results/h100-20261206-1117-w8_ab-*.json``), and on the H200 with
    this kernel 80.0 / 79.7 % against 81.4 / 81.7 % (fp8 block / per tensor, same call,
    ``results/h200-20261206-2325-w8_ab-{default,rows16}.json``); it stays
    ``benchmarks/w8_rule.py rows16``."""
    block_k = min(2048, max(FP8_BLOCK, triton.next_power_of_2(k)))
    block_n = 8
    while block_n > 2 and rows * triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    while triton.cdiv(n, block_n) > _MAX_GRID_Y:
        block_n *= 2
    return W8GemvConfig(block_n, block_k, 8 if act == ACT_GROUP else 4, 1)


@functools.lru_cache(maxsize=16)
def hardware_fp8_cast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the GEMV rounds activations onto ``dtype``'s grid by the hardware's saturating
    conversion: e4m3fn weights on an NVIDIA GPU of compute capability 8.9 or later (elsewhere,
    and in the interpreter whose fp8 cast mis-rounds, :func:`round_fp8`)."""
    if dtype != torch.float8_e4m3fn or device.type != "cuda" or torch.version.hip is not None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _fp8_constants(dtype: torch.dtype) -> tuple[float, float]:
    if not dtype.is_floating_point:
        return 1.0, 0.0
    smallest = float(torch.finfo(dtype).smallest_normal)
    return smallest, 1.5 * 2.0**23 * smallest / 8


def w8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, act: int,
            ws: int, qmax: float, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
            config: W8GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K]`` (last dim contiguous, ``M <= W8_GEMV_MAX_ROWS`` is where it pays) and
    ``weight [N, K]`` fp8 e4m3 (fn or fnuz) or int8, contiguous last dim -> ``[M, N]`` in
    ``out_dtype``: ``sum_k quant(x)[m, k] * weight[n, k] * sw(n, k) (+ bias)`` with ``quant``
    the scheme's dynamic activation quantization at granularity ``act`` onto ``weight``'s
    grid (``qmax``: 448 / 240 / 127) and ``sw`` the fp32 ``weight_scale`` of layout ``ws``
    (contiguous: ``[1]``, ``[N]`` or ``[ceil(N/128), ceil(K/128)]``). fp32 accumulation.
    Raises ``ValueError`` for mismatched shapes."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"w8_gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} must "
                         "agree on K with contiguous last dims")
    want = {WS_TENSOR: (1,), WS_CHANNEL: (n,),
            WS_BLOCK: (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK))}[ws]
    if tuple(weight_scale.shape) != want or not weight_scale.is_contiguous():
        raise ValueError(f"w8_gemv: weight scale {tuple(weight_scale.shape)}, expected {want}")
    cfg = config or choose_w8_config(n, k, m, x.device, act)
    blocked = act == ACT_GROUP or ws == WS_BLOCK
    if blocked and (cfg.block_k % FP8_BLOCK or FP8_BLOCK % cfg.block_n):
        raise ValueError(f"w8_gemv: {cfg} does not tile 128x128 scale blocks")
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    min_normal, sub_magic = _fp8_constants(weight.dtype)
    even = n % cfg.block_n == 0 and k % cfg.block_k == 0
    _w8_gemv_kernel[(m, triton.cdiv(n, cfg.block_n))](
        x, weight, weight_scale, bias if bias is not None else y, y, m, n, k,
        x.stride(0), weight.stride(0), weight_scale.stride(0) if ws == WS_BLOCK else 0,
        y.stride(0), float(qmax), MIN_SCALE,
        ACT=act, WS=ws, IS_INT=not weight.dtype.is_floating_point, HAS_BIAS=bias is not None,
        MIN_NORMAL=min_normal, SUB_MAGIC=sub_magic, EVEN=even, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP=FP8_BLOCK,
        AMAX_BLOCK=128 if x.device.type == "cpu" else min(4096, triton.next_power_of_2(k)),
        FOLD=min(_FOLD, cfg.block_k), CAST_FP8=hardware_fp8_cast(weight.dtype, x.device),
        PREFETCH_LINES=(min(PREFETCH_MAX_LINES, triton.next_power_of_2(
            triton.cdiv(k - cfg.block_k, 128))) if cfg.prefetch_l2 and k > cfg.block_k else 0),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(x.device))
    return y
