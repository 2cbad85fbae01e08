"""Triton GEMV: ``y = W @ x (+ bias)`` for a single activation row, the batch-1 decode shape.

At one row a linear layer is a pure weight stream: every byte of ``W`` is read once and the
work per byte is one multiply-add, so the kernel's only job is to keep enough loads in flight
to run at the memory's bandwidth. One program owns ``BLOCK_N`` output features and walks the
whole ``K`` dimension, accumulating an fp32 ``[BLOCK_N, BLOCK_K]`` tile that is reduced once
at the end; no split-K, so no second reduction kernel (cuBLAS launches one for several of
Llama-8B's shapes). ``W`` loads are marked evict-first (streamed once), the activation row
evict-last (every program re-reads it from L2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.device_info import multiprocessors


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptr + k0 + offs_k, eviction_policy="evict_last")
        else:
            k_mask = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + k0 + offs_k, mask=k_mask, other=0.0,
                        eviction_policy="evict_last")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: output features per program, K per step, warps, pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def choose_config(n: int, k: int, device: torch.device) -> GemvConfig:
    """A launch shape for an ``N x K`` weight: 16-byte loads along K, and the fewest output
    features per program that still leave at least four programs per multiprocessor (so a
    4096-wide projection is not served by a few dozen programs). Measured on an H200
    (``benchmarks/gemv_sweep.py``)."""
    if device.type == "cpu":  # the interpreter: small tiles exercise the masks cheaply
        return GemvConfig(16, 64, 1, 1)
    block_k = 512 if k >= 512 else triton.next_power_of_2(max(k, 16))
    sms = multiprocessors(device)
    block_n = 16
    while block_n > 2 and triton.cdiv(n, block_n) < 4 * sms:
        block_n //= 2
    return GemvConfig(block_n, block_k, 4, 1)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """``x [1, K]`` (or ``[K]``), ``weight [N, K]`` with a contiguous last dim, optional
    ``bias [N]`` -> ``[1, N]`` (or ``[N]``) in ``x.dtype``; fp32 accumulation. Weight and bias
    are read in their own dtype. Raises ``ValueError`` on a shape mismatch or more than one
    row."""
    row = x.reshape(-1)
    n, k = weight.shape
    if row.numel() != k or (x.dim() > 1 and x.shape[-1] != k):
        raise ValueError(f"gemv: x {tuple(x.shape)} is not one row of {k} features")
    if weight.stride(1) != 1:
        raise ValueError("gemv: the weight's last dimension must be contiguous")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not match {n} outputs")
    if not row.is_contiguous():
        row = row.contiguous()
    cfg = config or choose_config(n, k, x.device)
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    even = n % cfg.block_n == 0 and k % cfg.block_k == 0
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        row, weight, bias if bias is not None else y, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN=even, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(*x.shape[:-1], n) if x.dim() > 1 else y
