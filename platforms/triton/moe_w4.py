"""Fused MoE over 4-bit weight-only (``w4a16``) experts at decode sizes (many tokens take
the grouped GEMM of :mod:`.moe_gemm_w4`).

Layout (:class:`~heteroserve.core.kernels.ops.MoEWeightQuant`, scheme ``w4a16``): ``w13``
int32 ``[E, 2I, H // 8]``, ``w2`` int32 ``[E, H, I // 8]``; word ``w`` of a row holds input
feature ``8w + j`` in bits ``4j .. 4j + 3``; fp32 scales and int8 zeros ``[E, N, K // G]``;
``W[e, n, k] = (q - zero[e, n, k // G]) * scale[e, n, k // G]``.

:func:`decode_moe_w4` has the structure of :func:`~.moe_decode.decode_moe` (two launches,
no sorting, no host synchronisation, graph-capturable):

1. ``_w4_gate_up_kernel``, grid ``(I tiles) x (pairs)``, pair fastest: a program reads its
   pair's expert id, streams that expert's gate and up word rows ``[BLOCK_N, BLOCK_KW]``
   along ``K = H`` against the token's ``x`` and writes fp32 ``silu(gate) * up`` to
   ``inter[pair]``.
2. ``_w4_down_kernel``, grid ``(H tiles) x (tokens)``, token fastest: a program loads the
   ``[BLOCK_N, BLOCK_KW]`` word tiles of all the token's ``k`` experts at once (``BLOCK_E =
   next_power_of_2(k)`` slots, those past ``k`` read expert 0 against a zero activation),
   multiplies them by ``inter[pair] * topk_weights[pair]``, sums the slots in a fixed order
   (deterministic, no atomics) and rounds the token's output once to ``x.dtype``.

Arithmetic: a K step of ``BLOCK_KW`` words either lies inside one group (``BLOCK_KW``
divides ``G / 8``) or covers whole groups (``G / 8`` divides ``BLOCK_KW``); per group of a
row, ``acc += scale * (sum_k q_k a_k - zero * sum_k a_k)`` in fp32, so a zero point and a
scale apply once a group. The step's activations ``[BLOCK_KW, 8]`` are split into their
eight columns, so a word's eight products are summed in the thread that holds the word and
only the words of a group are reduced across threads, once a step. Nibbles become fp32
without an int-to-float conversion: or-ed under the exponent of ``2**23`` and ``2**23``
subtracted (exact for 0..15).

Rows past ``N`` re-read row ``N - 1`` (clamped) and are never stored, so weight loads need a
mask only on a ragged last K step. PDL (``pdl.py``): the gate-up kernel waits before it
reads the ids (its weights depend on them); the down kernel loads ids, routing weights and
its first weight step before the wait, as ``moe_decode`` does (they were complete before
the gate-up kernel started, which waited for them), and ``inter`` after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.ops import MoEWeightQuant, check_w4_experts, moe_expert_dims
from heteroserve.platforms.triton import device_info
from heteroserve.platforms.triton.jit_math import split8
from heteroserve.platforms.triton.moe_decode import outputs_per_program
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

#: packed bytes of each weight row a program loads per K step on a GPU (64 words, 512
#: features): between ``moe_decode``'s 256 (down) and 512 (gate-up) bytes of bf16 rows. On an
#: H100 half of it was slower for both kernels and twice it 1-10 % faster for the gate-up
#: kernel alone (``results/h100-20261206-1856-moe_w4_sweep.json``); kept.
_ROW_BYTES = 256
_TWO_23 = tl.constexpr(8388608.0)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class W4Tile:
    """One kernel's launch shape: ``block_n`` output rows per program and ``block_kw``
    packed words (``8 * block_kw`` features) per K step, both powers of two; ``block_kw``
    must divide ``G / 8`` or be a multiple of it."""

    block_n: int
    block_kw: int
    num_warps: int = 4
    num_stages: int = 1


@dataclass(frozen=True)
class W4DecodeConfig:
    """Launch shapes of the gate-up kernel (``block_n`` gate rows and as many up rows per
    program) and of the down kernel (``block_n`` rows per expert slot)."""

    gate_up: W4Tile
    down: W4Tile


def _block_kw(kw: int, group_words: int, target: int) -> int:
    """``target`` words (a power of two), halved once where that makes the K loop exact, at
    most ``kw`` rounded up to a power of two, and compatible with ``group_words`` (a group
    of a non-power-of-two word count takes its largest power-of-two divisor)."""
    b = target
    if kw % b and kw % (b // 2) == 0:
        b //= 2
    b = min(b, triton.next_power_of_2(kw))
    if group_words & (group_words - 1):
        b = min(b, group_words & -group_words)
    return max(b, 1)


def choose_w4_tiles(num_tokens: int, top_k: int, hidden: int, inter: int, group: int,
                    multiprocessors: int) -> W4DecodeConfig:
    """GPU launch shapes for ``T = num_tokens`` tokens over ``top_k`` experts of ``w13 [E,
    2*inter, hidden / 8]`` words with group ``group``: ``_ROW_BYTES`` (256) bytes of each
    packed row per step (:func:`_block_kw`); the gate-up kernel 8 outputs x 2 rows a program,
    fewer while under four programs per multiprocessor; the down kernel 32 weight rows a
    program (``32 / next_power_of_2(top_k)`` outputs x that many slots), fewer while under
    two programs per multiprocessor. Why 32 rows for the down kernel: on an H100
    (``benchmarks/moe_w4_sweep.py``, 2026-12-06 18:56 UTC,
    ``results/h100-20261206-1856-moe_w4_sweep.json``) 4 outputs x 8 slots took the Qwen3-30B-A3B
    pair from 24.7 to 18.9 us at one token and from 146 to 115 us at eight, the best of
    every single-knob change from the 16-row start; the other knobs are that sweep's
    neighbours, not tuned further."""
    words = _ROW_BYTES // 4
    gw = group // 8
    return W4DecodeConfig(
        W4Tile(outputs_per_program(2, num_tokens * top_k, inter, multiprocessors),
               _block_kw(hidden // 8, gw, words)),
        W4Tile(outputs_per_program(triton.next_power_of_2(top_k), num_tokens, hidden,
                                   multiprocessors, rows=32, per_sm=2),
               _block_kw(inter // 8, gw, words)))


def choose_w4_config(num_tokens: int, top_k: int, hidden: int, inter: int, group: int,
                     device: torch.device) -> W4DecodeConfig:
    """:func:`choose_w4_tiles` on a GPU; on CPU (the interpreter) small tiles, 16 x 8 words
    (gate-up) and 8 x 4 words (down), one warp, which leave ragged N tiles and K steps at
    the tests' sizes."""
    if device.type == "cpu":
        gw = group // 8
        return W4DecodeConfig(W4Tile(16, _block_kw(hidden // 8, gw, 8), 1),
                              W4Tile(8, _block_kw(inter // 8, gw, 4), 1))
    return choose_w4_tiles(num_tokens, top_k, hidden, inter, group,
                           device_info.multiprocessors(device))


@triton.jit
def _nibble_f32(v):
    """The low nibble of each int32 of ``v`` as exact fp32 0..15 (no int-to-float
    conversion: or-ed under the exponent of ``2**23``, which is then subtracted)."""
    return ((v & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - _TWO_23


@triton.jit
def _columns_and_sum(v):
    """``v [..., 2, 2, 2]`` (a last dim of 8 reshaped) -> its eight columns ``[...]`` in
    order (:func:`~.jit_math.split8`) and their sum."""
    c0, c1, c2, c3, c4, c5, c6, c7 = split8(v)
    return (c0, c1, c2, c3, c4, c5, c6, c7), ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7))


@triton.jit
def _word_dot(q, cols, AXIS: tl.constexpr):
    """``sum_j nibble_j(q) * cols[j]`` in fp32, ``cols[j]`` broadcast along ``AXIS`` of
    ``q``: each word's eight products summed in its own thread."""
    d = _nibble_f32(q) * tl.expand_dims(cols[0], AXIS)
    for j in tl.static_range(1, 8):
        d += _nibble_f32(q >> (4 * j)) * tl.expand_dims(cols[j], AXIS)
    return d


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr, EVICT: tl.constexpr):
    """``ptrs`` loaded, under ``mask`` (0 elsewhere) only where ``MASKED``."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0, eviction_policy=EVICT)
    else:
        return tl.load(ptrs, eviction_policy=EVICT)


@triton.jit
def _w4_gate_up_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, inter_ptr, N, KW, num_pairs, top_k, stride_xm,
    stride_it, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
    GROUP_W: tl.constexpr, GPS: tl.constexpr, MASK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, USE_PDL: tl.constexpr,
):
    # GPS: groups per K step (1 when a step lies inside one group)
    pid = tl.program_id(0)
    pair = pid % num_pairs
    offs_n = (pid // num_pairs) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_KW)
    offs_g = tl.arange(0, GPS)
    wait_for_previous(USE_PDL)  # the expert id decides which weights to read
    expert = tl.load(ids_ptr + (pair // top_k) * stride_it + pair % top_k).to(tl.int64)
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64) * stride_xm \
        + offs_w[:, None] * 8 + tl.arange(0, 8)[None, :]
    q_ptrs = w_ptr + expert * stride_we + rows[:, None] * stride_wn + offs_w[None, :]
    s_ptrs = s_ptr + expert * stride_se + rows[:, None] * stride_sn + offs_g[None, :]
    z_ptrs = z_ptr + expert * stride_ze + rows[:, None] * stride_zn + offs_g[None, :]
    q_up, s_up, z_up = N * stride_wn, N * stride_sn, N * stride_zn
    acc_gate = tl.zeros([BLOCK_N, GPS], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, GPS], dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_KW):
        k_mask = (kw0 + offs_w) < KW
        g0 = kw0 // GROUP_W
        g_mask = (g0 * GROUP_W + offs_g * GROUP_W < KW)[None, :]
        qg = _load(q_ptrs + kw0, k_mask[None, :], MASK_K, "evict_first")
        qu = _load(q_ptrs + q_up + kw0, k_mask[None, :], MASK_K, "evict_first")
        sg = _load(s_ptrs + g0, g_mask, MASK_K, "evict_first")
        su = _load(s_ptrs + s_up + g0, g_mask, MASK_K, "evict_first")
        zg = _load(z_ptrs + g0, g_mask, MASK_K, "evict_first").to(tl.float32)
        zu = _load(z_ptrs + z_up + g0, g_mask, MASK_K, "evict_first").to(tl.float32)
        x = _load(x_ptrs + kw0 * 8, k_mask[:, None], MASK_K, "evict_last").to(tl.float32)
        cols, x_sum = _columns_and_sum(tl.reshape(x, [BLOCK_KW, 2, 2, 2]))
        x_sum = tl.sum(tl.reshape(x_sum, [GPS, BLOCK_KW // GPS]), axis=1)
        dg = _word_dot(qg, cols, 0)
        du = _word_dot(qu, cols, 0)
        dg = tl.sum(tl.reshape(dg, [BLOCK_N, GPS, BLOCK_KW // GPS]), axis=2)
        du = tl.sum(tl.reshape(du, [BLOCK_N, GPS, BLOCK_KW // GPS]), axis=2)
        acc_gate += sg * (dg - zg * x_sum[None, :])
        acc_up += su * (du - zu * x_sum[None, :])
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    tl.store(inter_ptr + pair.to(tl.int64) * N + offs_n, gate / (1.0 + tl.exp(-gate)) * up,
             mask=offs_n < N)


@triton.jit
def _w4_down_weights(q_ptrs, s_ptrs, z_ptrs, kw0, k_mask, KW, GROUP_W: tl.constexpr,
                     GPS: tl.constexpr, MASK_K: tl.constexpr):
    """One K step's words ``[BLOCK_E, BLOCK_N, BLOCK_KW]``, scales and fp32 zeros
    ``[BLOCK_E, BLOCK_N, GPS]`` at word ``kw0``; ``k_mask [BLOCK_KW]``: the step's words
    ``< KW``."""
    g0 = kw0 // GROUP_W
    g_mask = (g0 * GROUP_W + tl.arange(0, GPS) * GROUP_W < KW)[None, None, :]
    q = _load(q_ptrs + kw0, k_mask[None, None, :], MASK_K, "evict_first")
    s = _load(s_ptrs + g0, g_mask, MASK_K, "evict_first")
    z = _load(z_ptrs + g0, g_mask, MASK_K, "evict_first").to(tl.float32)
    return q, s, z


@triton.jit
def _w4_down_step(acc, q, s, z, a_ptrs, a_mask, route, BLOCK_E: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GPS: tl.constexpr):
    """``acc [BLOCK_E, BLOCK_N, GPS]`` plus one K step: the words ``q`` against
    ``inter * route`` (``a_ptrs [BLOCK_E, BLOCK_KW, 8]``, zero outside ``a_mask``)."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0) * route[:, None, None]
    cols, a_sum = _columns_and_sum(tl.reshape(a, [BLOCK_E, BLOCK_KW, 2, 2, 2]))
    a_sum = tl.sum(tl.reshape(a_sum, [BLOCK_E, GPS, BLOCK_KW // GPS]), axis=2)
    d = _word_dot(q, cols, 1)
    d = tl.sum(tl.reshape(d, [BLOCK_E, BLOCK_N, GPS, BLOCK_KW // GPS]), axis=3)
    return acc + s * (d - z * a_sum[:, None, :])


@triton.jit
def _w4_down_kernel(
    inter_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, route_ptr, out_ptr, N, KW, num_tokens,
    stride_it, stride_rt, stride_om, stride_we, stride_wn, stride_se, stride_sn, stride_ze,
    stride_zn, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_W: tl.constexpr,
    GPS: tl.constexpr, MASK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    token = pid % num_tokens
    offs_e = tl.arange(0, BLOCK_E)
    offs_n = (pid // num_tokens) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_w = tl.arange(0, BLOCK_KW)
    offs_g = tl.arange(0, GPS)
    e_mask = offs_e < TOP_K
    # ids, routing weights and w2 were complete before the gate-up kernel began (it waited
    # for them), so they and the first step's weights load before the wait; inter after it
    experts = tl.load(ids_ptr + token * stride_it + offs_e, mask=e_mask, other=0).to(tl.int64)
    route = tl.load(route_ptr + token * stride_rt + offs_e, mask=e_mask,
                    other=0.0).to(tl.float32)
    q_ptrs = w_ptr + experts[:, None, None] * stride_we + rows[None, :, None] * stride_wn \
        + offs_w[None, None, :]
    s_ptrs = s_ptr + experts[:, None, None] * stride_se + rows[None, :, None] * stride_sn \
        + offs_g[None, None, :]
    z_ptrs = z_ptr + experts[:, None, None] * stride_ze + rows[None, :, None] * stride_zn \
        + offs_g[None, None, :]
    pairs = (token * TOP_K + offs_e).to(tl.int64)
    a_ptrs = inter_ptr + pairs[:, None, None] * (KW * 8) + offs_w[None, :, None] * 8 \
        + tl.arange(0, 8)[None, None, :]
    k_mask = offs_w < KW
    q, s, z = _w4_down_weights(q_ptrs, s_ptrs, z_ptrs, 0, k_mask, KW, GROUP_W, GPS, MASK_K)
    wait_for_previous(USE_PDL)
    acc = tl.zeros([BLOCK_E, BLOCK_N, GPS], dtype=tl.float32)
    acc = _w4_down_step(acc, q, s, z, a_ptrs, e_mask[:, None, None] & k_mask[None, :, None],
                        route, BLOCK_E, BLOCK_N, BLOCK_KW, GPS)
    for kw0 in range(BLOCK_KW, KW, BLOCK_KW):
        k_mask = (kw0 + offs_w) < KW
        q, s, z = _w4_down_weights(q_ptrs, s_ptrs, z_ptrs, kw0, k_mask, KW, GROUP_W, GPS,
                                   MASK_K)
        acc = _w4_down_step(acc, q, s, z, a_ptrs + kw0 * 8,
                            e_mask[:, None, None] & k_mask[None, :, None], route, BLOCK_E,
                            BLOCK_N, BLOCK_KW, GPS)
    y = tl.sum(tl.sum(acc, axis=2), axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + offs_n,
             y.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def _check_tile(tile: W4Tile, group_words: int, name: str) -> None:
    """Raise ``ValueError`` unless ``tile`` fits :class:`W4Tile`'s contract."""
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    if not (pow2(tile.block_n) and pow2(tile.block_kw) and pow2(tile.num_warps)
            and tile.num_stages >= 1
            and (group_words % tile.block_kw == 0 or tile.block_kw % group_words == 0)):
        raise ValueError(f"decode_moe_w4: {name} tile {tile} needs powers of two, block_kw "
                         f"dividing or a multiple of the group's {group_words} words")


def _last_dim_unit(name: str, *tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in tensors):
        raise ValueError(f"decode_moe_w4: {name} need a contiguous last dim")


def decode_moe_w4(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, quant: MoEWeightQuant,
                  config: W4DecodeConfig | None = None) -> torch.Tensor:
    """The ``FusedMoEOp`` product over ``w4a16`` experts for few tokens, two launches.

    ``x [T, H]`` bf16/fp16/fp32 (a strided last dim is copied); ``w13`` int32
    ``[E, 2I, H // 8]``, ``w2`` int32 ``[E, H, I // 8]`` with ``quant`` as
    :class:`~heteroserve.core.kernels.ops.MoEWeightQuant` (scheme ``w4a16``) describes;
    weights, scales and zeros with a contiguous last dim (other strides any).
    ``topk_weights [T, k]`` any float dtype (read as fp32), ``topk_ids [T, k]`` int32 or
    int64 in ``[0, E)`` (not checked: no host sync), both with rows of any stride (a copy
    only for a strided last dim). ``silu(gate) * up`` is kept in fp32 and the weighted sum
    over ``k`` is rounded once to ``x.dtype``. Returns a new ``[T, H]`` tensor in
    ``x.dtype``. ``config``: launch shapes, default :func:`choose_w4_config`.
    Raises ``ValueError`` for shapes, dtypes or a config outside this contract."""
    _, inter, h = moe_expert_dims(w13, w2, quant)
    if quant.scheme != "w4a16":
        raise ValueError(f"decode_moe_w4: scheme {quant.scheme!r}, not 'w4a16'")
    check_w4_experts(quant, w13, w2)
    if x.dim() != 2 or x.shape[1] != h or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"decode_moe_w4: x {tuple(x.shape)} {x.dtype} must be [T, {h}] "
                         "fp32/bf16/fp16")
    if (topk_ids.dim() != 2 or tuple(topk_weights.shape) != tuple(topk_ids.shape)
            or topk_ids.shape[0] != x.shape[0] or topk_ids.shape[1] < 1
            or topk_ids.dtype not in (torch.int32, torch.int64)
            or not topk_weights.dtype.is_floating_point):
        raise ValueError(f"decode_moe_w4: topk_weights {tuple(topk_weights.shape)} "
                         f"{topk_weights.dtype} / topk_ids {tuple(topk_ids.shape)} "
                         f"{topk_ids.dtype} must be float / int32|int64 [T, k], k >= 1")
    _last_dim_unit("weights, scales and zeros", w13, w2, quant.w13_scale, quant.w2_scale,
                   quant.w13_zero, quant.w2_zero)
    t, top_k = topk_ids.shape
    gw = quant.group_size // 8
    cfg = config or choose_w4_config(t, top_k, h, inter, quant.group_size, x.device)
    _check_tile(cfg.gate_up, gw, "gate-up")
    _check_tile(cfg.down, gw, "down")
    out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    ids = topk_ids if topk_ids.stride(1) == 1 else topk_ids.contiguous()
    route = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
    pairs = t * top_k
    hidden_act = torch.empty((pairs, inter), dtype=torch.float32, device=x.device)
    pdl = pdl_args(x.device)
    s13, z13, s2, z2 = quant.w13_scale, quant.w13_zero, quant.w2_scale, quant.w2_zero
    g, d = cfg.gate_up, cfg.down
    kw13, kw2 = h // 8, inter // 8
    _w4_gate_up_kernel[(triton.cdiv(inter, g.block_n) * pairs,)](
        x, w13, s13, z13, ids, hidden_act, inter, kw13, pairs, top_k, x.stride(0),
        ids.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        z13.stride(0), z13.stride(1), GROUP_W=gw, GPS=max(1, g.block_kw // gw),
        MASK_K=kw13 % g.block_kw != 0, BLOCK_N=g.block_n, BLOCK_KW=g.block_kw,
        num_warps=g.num_warps, num_stages=g.num_stages, **pdl)
    _w4_down_kernel[(triton.cdiv(h, d.block_n) * t,)](
        hidden_act, w2, s2, z2, ids, route, out, h, kw2, t, ids.stride(0), route.stride(0),
        out.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        z2.stride(0), z2.stride(1), TOP_K=top_k, BLOCK_E=triton.next_power_of_2(top_k),
        GROUP_W=gw, GPS=max(1, d.block_kw // gw), MASK_K=kw2 % d.block_kw != 0,
        BLOCK_N=d.block_n, BLOCK_KW=d.block_kw, num_warps=d.num_warps,
        num_stages=d.num_stages, **pdl)
    return out
