"""Fused MoE for few tokens (decode): two GEMV-style launches, no sorting.

At decode sizes each (token, expert) pair multiplies one activation row by its expert's
weights, so the layer is a weight stream like the dense GEMV (``gemv.py``) and the grouped
GEMM's machinery (pairs sorted and padded by expert, ``BLOCK_M``-row tiles, a torch sum over
``k``) costs more launches than the weights take to read. Here:

1. ``_gate_up_kernel``, grid ``(N tiles) x (pairs)``, pair fastest: a program reads its
   pair's expert id straight from ``topk_ids``, streams that expert's gate and up rows
   ``[BLOCK_N, K]`` along ``K`` (``K`` = hidden) against the token's row, and writes
   ``silu(gate) * up`` to the fp32 row ``inter[pair]``. Pair-fastest order puts the programs
   of one ``N`` tile on the device together, so pairs of different tokens that share an
   expert read its tile once from DRAM and then from the L2.
2. ``_down_kernel``, grid ``(N tiles) x (tokens)``, token fastest: a program loads the
   ``[BLOCK_N, BLOCK_K]`` tiles of all the token's ``k`` experts in one 3-D load, multiplies
   them by ``inter[pair] * topk_weights[pair]`` into one fp32 accumulator, reduces it in a
   fixed order and writes the token's output once: the routing-weighted sum over ``k`` is
   fused, deterministic (no atomics) and rounded once to ``x.dtype``; loading the ``k``
   experts together keeps ``k`` GEMV tiles in flight per program.

Block-scaled weights (``W_SCALED``, fp8_block experts, weight-only): the weight tiles hold
the stored values (fp8 e4m3fn; any float dtype runs, as in the interpreter tests) and one
fp32 scale per 128x128 block. A program's ``BLOCK_N`` rows (a divisor of 128) lie in one
block row, so the scales fold into the activation: each K step multiplies ``x`` (gate and
up rows: their own block rows) or ``inter * route`` by the scales of its columns (one
scalar per tile when ``BLOCK_K`` divides 128, else each 128-column group's scale loaded once
and repeated), and the tile is converted to fp32 and multiplied as above.

Both launch with PDL where the platform has it (``pdl.py``). The down kernel loads its first
weight tile before it waits: its inputs other than ``inter`` were complete before the gate-up
kernel started (that kernel waited for them), so only ``inter`` needs the wait. No host
synchronisation anywhere: the pair is graph-capturable.

Bytes: the gate-up kernel moves ``pairs * 2 * I * H`` weight elements from L2 to the SMs and
the down kernel ``pairs * H * I``; with the pair-fastest grids, DRAM sees each distinct
expert's tiles about once, so the DRAM traffic is that of the routed experts actually touched
(``distinct * 3 * I * H`` elements) plus ``x``, ``inter`` and the output (negligible).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.platforms.triton import device_info
from heteroserve.platforms.triton.jit_math import fold2, fold3
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

#: Largest ``T * top_k`` that takes this path (``fused_moe`` uses the grouped GEMM above).
#: Each pair streams its expert's weights into the SMs, while the grouped GEMM streams every
#: touched expert once for all its pairs; the surplus, ``pairs / distinct experts``, is served
#: by the L2 (pair- and token-fastest grids), whose bandwidth is about 2.5x the DRAM's on
#: Hopper. With uniform routing 64 pairs over 128 experts (Qwen3-30B-A3B, T=8) touch about 52
#: experts (surplus 1.24x), 60 over 64 experts (DeepSeek-V2-Lite, T=10) about 40 (1.5x): well
#: inside the L2's margin, while the grouped path's ten-odd sorting launches cost, by
#: estimate, what reading ~100 MB does (25 us at 4 TB/s; a whole T=1 layer is 75-104 MB).
#: At 128 pairs the surplus reaches 1.55x over 128 experts but 2.3x over 64, so the limit
#: stays at 64; ``benchmarks/moe_decode_sweep.py`` times both paths at T = 1..16 to move it.
MAX_DECODE_PAIRS = 64

#: bytes of one weight row a program loads per step, gate-up and down kernel. Measured on the
#: H200 (``moe_decode_sweep.py``, ``results/moe_decode_sweep_h200.json``): 1 KiB for both
#: before; 512 bytes for the gate-up kernel were faster in every case swept on 2026-12-04 and
#: 256 for the down kernel in every case on 2026-12-05 (Qwen3-30B-A3B, one token: 22.7 ->
#: 21.2 us; DeepSeek-V2-Lite with its shared experts fused: 43.2 -> 36.7 us; eight Qwen3
#: tokens: 141 -> 124 us).
_GATE_UP_ROW_BYTES = 512
_DOWN_ROW_BYTES = 256


@dataclass(frozen=True)
class DecodeTile:
    """One kernel's launch shape: output features per program, K per step, warps, stages;
    and ``fold``: each ``fold`` adjacent columns' products summed before the fp32
    accumulator (:func:`~.jit_math.fold2`; 1: an accumulator of the tile's shape)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    fold: int = 1


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shapes of the gate-up kernel (``block_n`` gate rows and as many up rows per
    program) and of the down kernel."""

    gate_up: DecodeTile
    down: DecodeTile


def _block_k(k: int, elem_bytes: int, row_bytes: int) -> int:
    """``row_bytes`` worth of elements, or half that when it divides ``K`` and the full
    width does not (no masked tail); at most ``K`` rounded up to a power of two."""
    full = row_bytes // elem_bytes
    if k % full and k % (full // 2) == 0:
        full //= 2
    return min(full, max(16, triton.next_power_of_2(k)))


def outputs_per_program(rows_per_output: int, units: int, n: int, sms: int, rows: int = 16,
                        per_sm: int = 4) -> int:
    """The fewest output features per program, from ``rows // rows_per_output`` down to 1,
    that still give ``units * cdiv(n, block_n) >= per_sm * sms`` programs (by default four
    per multiprocessor, as ``gemv.choose_config``: a program then loads about ``rows`` weight
    rows per step)."""
    block_n = max(1, rows // rows_per_output)
    while block_n > 1 and units * triton.cdiv(n, block_n) < per_sm * sms:
        block_n //= 2
    return block_n


def choose_tiles(num_tokens: int, top_k: int, hidden: int, inter: int, elem_bytes: int,
                 multiprocessors: int) -> DecodeConfig:
    """Launch shapes on a GPU of ``multiprocessors`` SMs for ``T = num_tokens`` tokens over
    ``top_k`` experts with ``w13 [E, 2*inter, hidden]`` of ``elem_bytes`` per element:
    512 bytes of each gate/up row and 256 of each down row per step (half that where it makes
    the K loop exact), and the fewest outputs per program that keep four programs per multiprocessor. A gate-up program
    loads two rows (gate and up) per output, a down program one row per expert slot
    (``next_power_of_2(top_k)``) per output, so both keep about 16 rows in flight."""
    return DecodeConfig(
        DecodeTile(outputs_per_program(2, num_tokens * top_k, inter, multiprocessors),
                   _block_k(hidden, elem_bytes, _GATE_UP_ROW_BYTES)),
        DecodeTile(outputs_per_program(triton.next_power_of_2(top_k), num_tokens, hidden,
                                       multiprocessors),
                   _block_k(inter, elem_bytes, _DOWN_ROW_BYTES)))


def choose_config(num_tokens: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype,
                  device: torch.device) -> DecodeConfig:
    """:func:`choose_tiles` for ``device``; on CPU (the interpreter) small tiles that
    exercise the masks."""
    if device.type == "cpu":
        return DecodeConfig(DecodeTile(16, 32, 1), DecodeTile(8, 32, 1))
    return choose_tiles(num_tokens, top_k, hidden, inter, torch.finfo(dtype).bits // 8,
                        device_info.multiprocessors(device))


@triton.jit
def _column_scales(row_ptr, k0, K, BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """The fp32 scales of columns ``k0 .. k0 + BLOCK_K`` in one block row (``row_ptr``: its
    first scale): one scalar when the tile lies in one block column (``BLOCK_K`` divides
    ``SCALE_BLOCK``), else ``[BLOCK_K]``, each group's scale loaded once and repeated."""
    if BLOCK_K <= SCALE_BLOCK:
        return tl.load(row_ptr + k0 // SCALE_BLOCK)
    else:
        g = k0 // SCALE_BLOCK + tl.arange(0, BLOCK_K // SCALE_BLOCK)
        s = tl.load(row_ptr + g, mask=g < tl.cdiv(K, SCALE_BLOCK), other=0.0)
        return tl.reshape(tl.broadcast_to(s[:, None], [BLOCK_K // SCALE_BLOCK, SCALE_BLOCK]),
                          [BLOCK_K])


@triton.jit
def _slot_scales(row_ptrs, k0, K, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                 SCALE_BLOCK: tl.constexpr):
    """:func:`_column_scales` for ``BLOCK_E`` block rows at once (``row_ptrs [BLOCK_E]``):
    ``[BLOCK_E, 1]`` or ``[BLOCK_E, BLOCK_K]``."""
    if BLOCK_K <= SCALE_BLOCK:
        return tl.load(row_ptrs + k0 // SCALE_BLOCK)[:, None]
    else:
        g = k0 // SCALE_BLOCK + tl.arange(0, BLOCK_K // SCALE_BLOCK)
        s = tl.load(row_ptrs[:, None] + g[None, :],
                    mask=(g < tl.cdiv(K, SCALE_BLOCK))[None, :], other=0.0)
        return tl.reshape(tl.broadcast_to(s[:, :, None],
                                          [BLOCK_E, BLOCK_K // SCALE_BLOCK, SCALE_BLOCK]),
                          [BLOCK_E, BLOCK_K])


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, ws_ptr, ids_ptr, inter_ptr, N, K, num_pairs, top_k, stride_xm, stride_we,
    stride_wn, stride_se, stride_sn, stride_it,
    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    W_SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr, FOLD: tl.constexpr,
):
    pid = tl.program_id(0)
    pair = pid % num_pairs
    offs_n = (pid // num_pairs) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    wait_for_previous(USE_PDL)  # the ids, x and (in tests) w13 may come from the last kernel
    expert = tl.load(ids_ptr + (pair // top_k) * stride_it + pair % top_k).to(tl.int64)
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_xm + offs_k
    gate_ptrs = w_ptr + expert * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn \
        + offs_k[None, :]
    up_off = N * stride_wn
    if W_SCALED:  # the block rows of this program's gate rows and up rows
        n0 = (pid // num_pairs) * BLOCK_N
        s_gate = ws_ptr + expert * stride_se + (n0 // SCALE_BLOCK) * stride_sn
        s_up = ws_ptr + expert * stride_se + ((N + n0) // SCALE_BLOCK) * stride_sn
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K // FOLD], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K // FOLD], dtype=tl.float32)
    # loads are written out in both branches (no helper): the interpreter pays per call
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            a = tl.load(x_ptrs + k0, eviction_policy="evict_last")
            w_gate = tl.load(gate_ptrs + k0, eviction_policy="evict_first")
            w_up = tl.load(gate_ptrs + up_off + k0, eviction_policy="evict_first")
        else:
            k_mask = k0 + offs_k < K
            w_mask = n_mask[:, None] & k_mask[None, :]
            a = tl.load(x_ptrs + k0, mask=k_mask, other=0.0, eviction_policy="evict_last")
            w_gate = tl.load(gate_ptrs + k0, mask=w_mask, other=0.0,
                             eviction_policy="evict_first")
            w_up = tl.load(gate_ptrs + up_off + k0, mask=w_mask, other=0.0,
                           eviction_policy="evict_first")
        a = a.to(tl.float32)
        if W_SCALED:
            a_gate = a * _column_scales(s_gate, k0, K, BLOCK_K, SCALE_BLOCK)
            a_up = a * _column_scales(s_up, k0, K, BLOCK_K, SCALE_BLOCK)
            acc_gate += fold2(w_gate.to(tl.float32) * a_gate[None, :], BLOCK_N, BLOCK_K, FOLD)
            acc_up += fold2(w_up.to(tl.float32) * a_up[None, :], BLOCK_N, BLOCK_K, FOLD)
        else:
            acc_gate += fold2(w_gate.to(tl.float32) * a[None, :], BLOCK_N, BLOCK_K, FOLD)
            acc_up += fold2(w_up.to(tl.float32) * a[None, :], BLOCK_N, BLOCK_K, FOLD)
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    tl.store(inter_ptr + pair.to(tl.int64) * N + offs_n, gate / (1.0 + tl.exp(-gate)) * up,
             mask=n_mask)


@triton.jit
def _down_kernel(
    inter_ptr, w_ptr, ws_ptr, ids_ptr, route_ptr, out_ptr, N, K, num_tokens, stride_we,
    stride_wn, stride_se, stride_sn, stride_om, stride_it, stride_rt, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    W_SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr, FOLD: tl.constexpr,
):
    # One load covers the tile [BLOCK_N, BLOCK_K] of all the token's experts at once
    # ([BLOCK_E, BLOCK_N, BLOCK_K], slots past TOP_K masked off), so a program keeps
    # TOP_K times a GEMV tile in flight while the grid stays N / BLOCK_N programs per token.
    pid = tl.program_id(0)
    token = pid % num_tokens
    offs_e = tl.arange(0, BLOCK_E)
    offs_n = (pid // num_tokens) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    e_mask = offs_e < TOP_K
    pairs = token * TOP_K + offs_e
    # ids, routing weights and w2 were complete before the gate-up kernel began (it waited
    # for them), so they and the first tile may load before the wait; ``inter`` needs it
    experts = tl.load(ids_ptr + token * stride_it + offs_e, mask=e_mask, other=0).to(tl.int64)
    route = tl.load(route_ptr + token * stride_rt + offs_e, mask=e_mask,
                    other=0.0).to(tl.float32)
    w_ptrs = w_ptr + experts[:, None, None] * stride_we \
        + offs_n.to(tl.int64)[None, :, None] * stride_wn + offs_k[None, None, :]
    a_ptrs = inter_ptr + pairs.to(tl.int64)[:, None] * K + offs_k[None, :]
    en_mask = e_mask[:, None, None] & (offs_n < N)[None, :, None]
    if EVEN:
        w = tl.load(w_ptrs, mask=en_mask, other=0.0, eviction_policy="evict_first")
    else:
        w = tl.load(w_ptrs, mask=en_mask & (offs_k < K)[None, None, :], other=0.0,
                    eviction_policy="evict_first")
    if W_SCALED:  # each slot's expert, this program's block row
        s_rows = ws_ptr + experts * stride_se \
            + ((pid // num_tokens) * BLOCK_N // SCALE_BLOCK) * stride_sn
    wait_for_previous(USE_PDL)
    ek_mask = e_mask[:, None] & (offs_k < K)[None, :]
    a = tl.load(a_ptrs, mask=ek_mask, other=0.0) * route[:, None]
    if W_SCALED:
        a = a * _slot_scales(s_rows, 0, K, BLOCK_E, BLOCK_K, SCALE_BLOCK)
    acc = fold3(w.to(tl.float32) * a[:, None, :], BLOCK_E, BLOCK_N, BLOCK_K, FOLD)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs + k0, mask=en_mask, other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, mask=en_mask & (k0 + offs_k < K)[None, None, :],
                        other=0.0, eviction_policy="evict_first")
        ek_mask = e_mask[:, None] & (k0 + offs_k < K)[None, :]
        a = tl.load(a_ptrs + k0, mask=ek_mask, other=0.0) * route[:, None]
        if W_SCALED:
            a = a * _slot_scales(s_rows, k0, K, BLOCK_E, BLOCK_K, SCALE_BLOCK)
        acc += fold3(w.to(tl.float32) * a[:, None, :], BLOCK_E, BLOCK_N, BLOCK_K, FOLD)
    y = tl.sum(tl.sum(acc, axis=2), axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + offs_n,
             y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def decode_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, config: DecodeConfig | None = None,
               scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The ``FusedMoEOp`` product for few tokens, two launches. Arguments as
    :func:`~heteroserve.platforms.triton.moe.fused_moe`, already checked there (shapes agree,
    ``T >= 1``, ``k >= 1``); ``w13``/``w2`` with a contiguous last dim. ``topk_ids`` int32 or
    int64, ``topk_weights`` any float dtype (read as fp32), both with rows of any stride (a
    copy only for a strided last dim). ``scales``: the fp32 block scales
    ``(w13_scale, w2_scale)`` of fp8_block experts (checked there: ``I`` a multiple of 128,
    contiguous last dims); the tiles' ``block_n`` must then divide 128. ``silu(gate) * up``
    is kept in fp32 and the weighted sum over ``k`` is rounded once to ``x.dtype``. Returns
    a new ``[T, H]`` tensor in ``x.dtype``. Ids outside ``[0, E)`` are not checked (no host
    sync). Raises ``ValueError`` for a ``config`` whose ``block_n`` splits a scale block."""
    t, h = x.shape
    top_k = topk_ids.shape[1]
    inter = w13.shape[1] // 2
    cfg = config or choose_config(t, top_k, h, inter, w13.dtype, x.device)
    if scales is not None and (FP8_BLOCK % cfg.gate_up.block_n or FP8_BLOCK % cfg.down.block_n):
        raise ValueError(f"decode_moe: block scales need block_n dividing {FP8_BLOCK}, got "
                         f"{cfg.gate_up.block_n} / {cfg.down.block_n}")
    s13, s2 = scales if scales is not None else (x, x)
    strides13 = (s13.stride(0), s13.stride(1)) if scales is not None else (0, 0)
    strides2 = (s2.stride(0), s2.stride(1)) if scales is not None else (0, 0)
    ids = topk_ids if topk_ids.stride(1) == 1 else topk_ids.contiguous()
    route = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    pairs = t * top_k
    hidden_act = torch.empty((pairs, inter), dtype=torch.float32, device=x.device)
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    pdl = pdl_args(x.device)
    g, d = cfg.gate_up, cfg.down
    scaled = scales is not None
    _gate_up_kernel[(triton.cdiv(inter, g.block_n) * pairs,)](
        x, w13, s13, ids, hidden_act, inter, h, pairs, top_k, x.stride(0), w13.stride(0),
        w13.stride(1), *strides13, ids.stride(0), EVEN=inter % g.block_n == 0 and h % g.block_k == 0,
        BLOCK_N=g.block_n, BLOCK_K=g.block_k, W_SCALED=scaled, SCALE_BLOCK=FP8_BLOCK,
        FOLD=min(g.fold, g.block_k), num_warps=g.num_warps, num_stages=g.num_stages, **pdl)
    _down_kernel[(triton.cdiv(h, d.block_n) * t,)](
        hidden_act, w2, s2, ids, route, out, h, inter, t, w2.stride(0), w2.stride(1),
        *strides2, out.stride(0), ids.stride(0), route.stride(0), TOP_K=top_k, BLOCK_E=triton.next_power_of_2(top_k),
        EVEN=h % d.block_n == 0 and inter % d.block_k == 0,
        BLOCK_N=d.block_n, BLOCK_K=d.block_k, W_SCALED=scaled, SCALE_BLOCK=FP8_BLOCK,
        FOLD=min(d.fold, d.block_k), num_warps=d.num_warps, num_stages=d.num_stages, **pdl)
    return out
