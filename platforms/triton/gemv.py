"""Triton GEMV: ``y = W @ a (+ bias)`` for a single activation row, the batch-1 decode shape,
optionally with the elementwise op that produces ``a`` folded in.

At one row a linear layer is a pure weight stream: every byte of ``W`` is read once and the
work per byte is one multiply-add, so the kernel's only job is to keep enough loads in flight
to run at the memory's bandwidth. One program owns ``BLOCK_N`` output features and walks the
whole ``K`` dimension, accumulating an fp32 ``[BLOCK_N, BLOCK_K]`` tile that is reduced once
at the end; no split-K, so no second reduction kernel (cuBLAS launches one for several of
Llama-8B's shapes). ``W`` loads are marked evict-first (streamed once), the activation row
evict-last (every program re-reads it from L2).

Because every program reads the whole activation row anyway, the op that makes it can run in
the same pass at no extra HBM traffic (the *prologue*), which saves a launch and a round trip
of the row per layer at batch 1 (on the H200 the re-read rows cost more than that once PDL
hides the launches, so these variants are not the default; docs/benchmarks/log.md):

- ``rms_norm``: ``h = x + residual``, ``a = h / rms(h) * g``. ``1 / rms(h)`` is a scalar, so
  the kernel accumulates ``W @ (h * g)`` and ``sum(h^2)`` together and scales once at the end;
  program 0 also writes ``h`` (the next residual).
- ``silu_and_mul``: ``x = [gate | up]``, ``a = silu(gate) * up`` rounded to the row's dtype,
  as the separate op would round it.

The gated *epilogue* (:func:`gemv_gated`) goes the other way: a projection whose outputs are
``[gate | up]`` (Llama's and Gemma's ``gate_up_proj``) hands each program ``BLOCK_N`` gate rows
and the matching up rows, and it writes ``act(gate) * up`` directly. That reads no byte more
than the plain GEMV and drops the activation kernel and its round trip of the row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.device_info import multiprocessors
from heteroserve.platforms.triton.jit_math import fold2, gate_activation
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

PLAIN, RMS_NORM, SILU_AND_MUL = 0, 1, 2
#: activations of :func:`gemv_gated` (the ``GATED_ACTIVATIONS`` of the linear contract)
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def weight_tile(w_ptrs, n_mask, k_mask, EVEN: tl.constexpr):
    """A ``[BLOCK_N, BLOCK_K]`` weight tile streamed once (evict first); unmasked when ``EVEN``."""
    if EVEN:
        return tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        return tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                       eviction_policy="evict_first")


@triton.jit
def _activation_tile(x_ptr, r_ptr, g_ptr, h_ptr, kk, k_mask, K, pid, sum_sq,
                     PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN: tl.constexpr):
    """``(a [BLOCK_K] fp32, sum_sq)``: the activation at columns ``kk`` after the prologue."""
    if EVEN:
        a = tl.load(x_ptr + kk, eviction_policy="evict_last")
    else:
        a = tl.load(x_ptr + kk, mask=k_mask, other=0.0, eviction_policy="evict_last")
    if PROLOGUE == 1:
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + kk, mask=k_mask, other=0.0, eviction_policy="evict_last")
            a = (a.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if pid == 0:
                tl.store(h_ptr + kk, a, mask=k_mask)
        h = a.to(tl.float32)
        sum_sq += h * h
        a = h * tl.load(g_ptr + kk, mask=k_mask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
    elif PROLOGUE == 2:
        gate = a.to(tl.float32)
        up = tl.load(x_ptr + K + kk, mask=k_mask, other=0.0,
                     eviction_policy="evict_last").to(tl.float32)
        a = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty)
    return a.to(tl.float32), sum_sq


@triton.jit
def _gemv_kernel(
    x_ptr, r_ptr, g_ptr, h_ptr, w_ptr, bias_ptr, y_ptr, N, K, stride_wn, eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    STATIC_WEIGHT: tl.constexpr, FOLD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    if STATIC_WEIGHT:  # no kernel of the step writes W: its first tile may load before the
        # wait, so with PDL that load's latency hides behind the previous kernel's tail
        w = weight_tile(w_ptrs, n_mask, offs_k < K, EVEN)
        wait_for_previous(USE_PDL)
    else:
        wait_for_previous(USE_PDL)
        w = weight_tile(w_ptrs, n_mask, offs_k < K, EVEN)
    sum_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    a, sum_sq = _activation_tile(x_ptr, r_ptr, g_ptr, h_ptr, offs_k, offs_k < K, K, pid, sum_sq,
                                 PROLOGUE, HAS_RESIDUAL, EVEN)
    acc = fold2(w.to(tl.float32) * a[None, :], BLOCK_N, BLOCK_K, FOLD)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        w_ptrs += BLOCK_K
        w = weight_tile(w_ptrs, n_mask, k_mask, EVEN)
        a, sum_sq = _activation_tile(x_ptr, r_ptr, g_ptr, h_ptr, kk, k_mask, K, pid, sum_sq,
                                     PROLOGUE, HAS_RESIDUAL, EVEN)
        acc += fold2(w.to(tl.float32) * a[None, :], BLOCK_N, BLOCK_K, FOLD)
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y / tl.sqrt(tl.sum(sum_sq, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: output features per program, K per step, warps, pipeline stages; and
    ``fold``: the products of each ``fold`` adjacent columns are summed before they join the
    fp32 accumulator, which is then ``[block_n, block_k / fold]`` (1: the tile's shape; 8 is
    one 16-byte bf16 load a thread, fewer registers for the same tile)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fold: int = 1


#: a plain GEMV program's step along K: 4 KiB of each bf16 weight row (see :func:`gemv_tiles`)
WIDE_BLOCK_K = 2048


def gemv_tiles(n: int, k: int, multiprocessors: int, prologue: int = PLAIN) -> GemvConfig:
    """The launch shape for an ``N x K`` weight on a GPU of ``multiprocessors`` SMs.

    Plain (and SiLU-and-mul prologue) GEMVs: four output features a program, halved while
    fewer programs than multiprocessors remain (a 128-expert router gets 128 one-row
    programs), and steps of ``WIDE_BLOCK_K`` columns (``K`` rounded up to a power of two when
    narrower): 16 KiB of bf16 weights a step, 4 warps. Measured on an H100
    (``benchmarks/decode_chain.py``, ``benchmarks/results/h100-20261206-0343-decode_chain.json``,
    every one-row linear of Llama-3.1-8B, Qwen3-30B-A3B, DeepSeek-V2-Lite and Gemma-3-12B
    replayed from a decode graph with PDL over weights past the L2): this shape is the
    fastest or within 3 % of the fastest of about 30 at each of the 14 shapes, where the rule
    before (512-column steps and as many features as kept four programs a multiprocessor:
    2 KiB steps for Qwen3's o_proj) took 4-120 % longer; batch-1 decode of all four models
    was 1-4 % faster in the engine (``benchmarks/gemv_rule.py``,
    ``results/h100-20261206-0406-*``; not yet measured on an H200). With the RMSNorm prologue
    every program re-reads three rows (x, residual, norm weight), so those programs keep the
    earlier shape: 16 outputs, 512-column steps."""
    if prologue == RMS_NORM:
        return GemvConfig(16, 512 if k >= 512 else triton.next_power_of_2(max(k, 16)), 4, 1)
    block_n = 4
    while block_n > 1 and triton.cdiv(n, block_n) < multiprocessors:
        block_n //= 2
    return GemvConfig(block_n, min(WIDE_BLOCK_K, triton.next_power_of_2(max(k, 16))), 4, 1)


def choose_config(n: int, k: int, device: torch.device, prologue: int = PLAIN) -> GemvConfig:
    """:func:`gemv_tiles` for ``device``; on CPU (the interpreter) small tiles that exercise
    the masks cheaply."""
    if device.type == "cpu":
        return GemvConfig(16, 64, 1, 1)
    return gemv_tiles(n, k, multiprocessors(device), prologue)


def _check_weight(weight: torch.Tensor, k: int, bias: torch.Tensor | None, op: str) -> None:
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} does not take {k} input features")
    if weight.stride(1) != 1:
        raise ValueError(f"{op}: the weight's last dimension must be contiguous")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} does not match {n} outputs")


def _one_row(x: torch.Tensor, width: int, op: str) -> torch.Tensor:
    row = x.reshape(-1)
    if row.numel() != width or (x.dim() > 1 and x.shape[-1] != width):
        raise ValueError(f"{op}: x {tuple(x.shape)} is not one row of {width} features")
    return row if row.is_contiguous() else row.contiguous()


def _launch(prologue: int, row: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: GemvConfig | None, static_weight: bool,
            residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            h: torch.Tensor | None = None, eps: float = 0.0,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    n, k = weight.shape
    cfg = config or choose_config(n, k, row.device, prologue)
    y = torch.empty(n, dtype=out_dtype or row.dtype, device=row.device)
    even = n % cfg.block_n == 0 and k % cfg.block_k == 0
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        row, residual if residual is not None else row,
        norm_weight if norm_weight is not None else row, h if h is not None else y,
        weight, bias if bias is not None else y, y, n, k, weight.stride(0), float(eps),
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        EVEN=even, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        STATIC_WEIGHT=static_weight, FOLD=min(cfg.fold, cfg.block_k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(row.device))
    return y


def _shape_like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y.view(*x.shape[:-1], y.shape[0]) if x.dim() > 1 else y


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, static_weight: bool = False,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x [1, K]`` (or ``[K]``), ``weight [N, K]`` with a contiguous last dim, optional
    ``bias [N]`` -> ``[1, N]`` (or ``[N]``) in ``out_dtype`` (default ``x.dtype``); fp32
    accumulation. ``x``, weight and bias are each read in their own dtype and widened to fp32. ``static_weight``: the caller guarantees that the kernel
    launched just before this one does not write ``weight`` (a model's loaded parameter, not
    a fresh cast), which lets the GEMV start reading it before that kernel finishes (PDL). Raises ``ValueError`` on a shape mismatch or more than one row. The two fused
    variants below take ``static_weight`` with the same meaning."""
    row = _one_row(x, x.shape[-1], "gemv")
    _check_weight(weight, row.numel(), bias, "gemv")
    return _shape_like(x, _launch(PLAIN, row, weight, bias, config, static_weight,
                                  out_dtype=out_dtype))


def gemv_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: GemvConfig | None = None, static_weight: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm then the projection, one launch. ``x`` and ``residual`` one row of ``K``
    (same dtype and shape), ``norm_weight [K]``. With ``h = x + residual`` rounded to
    ``x.dtype`` (``h = x`` when ``residual`` is None) returns
    ``(W @ (h / sqrt(mean(h^2) + eps) * norm_weight) + bias, h)``; the normalised row is kept
    in fp32 (the separate ops round it to ``x.dtype`` first). ``h`` is a new tensor, or ``x``
    itself without a residual; neither input is modified. Raises ``ValueError`` on shape or
    dtype mismatches."""
    k = x.shape[-1]
    row = _one_row(x, k, "gemv_rms_norm")
    _check_weight(weight, k, bias, "gemv_rms_norm")
    if norm_weight.shape != (k,):
        raise ValueError(f"gemv_rms_norm: norm weight {tuple(norm_weight.shape)} does not "
                         f"match {k} features")
    if residual is None:
        return _shape_like(x, _launch(RMS_NORM, row, weight, bias, config, static_weight,
                                      norm_weight=norm_weight, eps=eps)), x
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"gemv_rms_norm: x {x.dtype}{tuple(x.shape)} and residual "
                         f"{residual.dtype}{tuple(residual.shape)} differ")
    res_row = _one_row(residual, k, "gemv_rms_norm")
    h = torch.empty_like(row)
    y = _launch(RMS_NORM, row, weight, bias, config, static_weight, residual=res_row,
                norm_weight=norm_weight, h=h, eps=eps)
    return _shape_like(x, y), h.view(x.shape)


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      config: GemvConfig | None = None, static_weight: bool = False
                      ) -> torch.Tensor:
    """SiLU-and-mul then the projection, one launch: ``x [1, 2K]`` = ``[gate | up]``,
    ``weight [N, K]`` -> ``W @ (silu(gate) * up) + bias`` ``[1, N]`` in ``x.dtype``, with
    ``silu(gate) * up`` rounded to ``x.dtype`` as :func:`silu_and_mul` rounds it. Raises
    ``ValueError`` for an odd width or a shape mismatch."""
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"gemv_silu_and_mul: last dim must be even ([gate | up]), got {width}")
    row = _one_row(x, width, "gemv_silu_and_mul")
    _check_weight(weight, width // 2, bias, "gemv_silu_and_mul")
    return _shape_like(x, _launch(SILU_AND_MUL, row, weight, bias, config, static_weight))


@triton.jit
def _gemv_gated_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, N, K, stride_wn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, STATIC_WEIGHT: tl.constexpr,
):
    # program: gate rows offs_n and up rows N + offs_n of W [2N, K]; y[offs_n] = act(g) * u
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    g_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    u_ptrs = w_ptr + (offs_n.to(tl.int64) + N)[:, None] * stride_wn + offs_k[None, :]
    if STATIC_WEIGHT:  # as in _gemv_kernel: a loaded parameter may be read before the wait
        w_g = weight_tile(g_ptrs, n_mask, offs_k < K, EVEN)
        w_u = weight_tile(u_ptrs, n_mask, offs_k < K, EVEN)
        wait_for_previous(USE_PDL)
    else:
        wait_for_previous(USE_PDL)
        w_g = weight_tile(g_ptrs, n_mask, offs_k < K, EVEN)
        w_u = weight_tile(u_ptrs, n_mask, offs_k < K, EVEN)
    if EVEN:
        a = tl.load(x_ptr + offs_k, eviction_policy="evict_last").to(tl.float32)
    else:
        a = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0,
                    eviction_policy="evict_last").to(tl.float32)
    acc_g = w_g.to(tl.float32) * a[None, :]
    acc_u = w_u.to(tl.float32) * a[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
        w_g = weight_tile(g_ptrs, n_mask, k_mask, EVEN)
        w_u = weight_tile(u_ptrs, n_mask, k_mask, EVEN)
        if EVEN:
            a = tl.load(x_ptr + kk, eviction_policy="evict_last").to(tl.float32)
        else:
            a = tl.load(x_ptr + kk, mask=k_mask, other=0.0,
                        eviction_policy="evict_last").to(tl.float32)
        acc_g += w_g.to(tl.float32) * a[None, :]
        acc_u += w_u.to(tl.float32) * a[None, :]
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if HAS_BIAS:
        g += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        u += tl.load(bias_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, (gate_activation(g, ACT) * u).to(y_ptr.dtype.element_ty),
             mask=n_mask)


def gemv_gated(x: torch.Tensor, weight: torch.Tensor, activation: str,
               bias: torch.Tensor | None = None, config: GemvConfig | None = None,
               static_weight: bool = False) -> torch.Tensor:
    """The projection then the gated activation, one launch: ``x [1, K]`` (or ``[K]``),
    ``weight [2N, K]`` whose rows are ``[gate | up]`` (contiguous last dim), optional ``bias
    [2N]`` -> ``act(gate) * up`` ``[1, N]`` (or ``[N]``) in ``x.dtype``. ``gate`` and ``up``
    stay in fp32 (the separate ops round them to ``x.dtype`` first). ``activation``: one of
    :data:`GATED_ACTIVATIONS` (``gelu``: erf; ``gelu_tanh``: the tanh approximation).
    ``config``: the launch shape of the plain GEMV over all ``2N`` rows; each program takes
    half its ``block_n`` from each half. ``static_weight`` as for :func:`gemv`. Raises
    ``ValueError`` for an unknown activation, an odd number of rows or a shape mismatch."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"gemv_gated: activation must be one of {GATED_ACTIVATIONS}, got "
                         f"{activation!r}")
    row = _one_row(x, x.shape[-1], "gemv_gated")
    k = row.numel()
    _check_weight(weight, k, bias, "gemv_gated")
    if weight.shape[0] % 2:
        raise ValueError(f"gemv_gated: weight {tuple(weight.shape)} has an odd number of rows "
                         "(not [gate | up])")
    n = weight.shape[0] // 2
    cfg = config or choose_config(2 * n, k, row.device)
    block_n = max(1, cfg.block_n // 2)
    y = torch.empty(n, dtype=row.dtype, device=row.device)
    _gemv_gated_kernel[(triton.cdiv(n, block_n),)](
        row, weight, bias if bias is not None else y, y, n, k, weight.stride(0),
        ACT=activation, HAS_BIAS=bias is not None,
        EVEN=n % block_n == 0 and k % cfg.block_k == 0, BLOCK_N=block_n, BLOCK_K=cfg.block_k,
        STATIC_WEIGHT=static_weight, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **pdl_args(row.device))
    return _shape_like(x, y)
