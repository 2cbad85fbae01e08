"""Triton RMSNorm, fused residual-add + RMSNorm and RMSNorm / add / RMSNorm (contracts in
``core/kernels/ops.py``).

One program per row holds the whole row in registers (hidden sizes up to ``MAX_HIDDEN``);
math is fp32, outputs are rounded to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.core.kernels.ops import GRAPH_SAFE_ATTR
from heteroserve.platforms.cpu.norm import check_norm_add_norm
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

MAX_HIDDEN = 65536


@triton.jit
def _normed(x, w_ptr, offs, mask, hidden, eps):
    """fp32 row ``x`` times ``1 / sqrt(mean(x^2) + eps)`` times the weight row at ``w_ptr``."""
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x * inv_rms * w


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr,
    stride_x, stride_r, stride_y, hidden, eps,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(x_ptr.dtype.element_ty)
        tl.store(r_ptr + row * stride_r + offs, s, mask=mask)
        x = s.to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs,
             _normed(x, w_ptr, offs, mask, hidden, eps).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_add_norm_kernel(
    x_ptr, r_ptr, w_ptr, w_next_ptr, y_ptr,
    stride_x, stride_r, stride_y, hidden, eps,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One row: ``_rms_norm_kernel`` without residual, then with it, the intermediate row
    kept in registers but rounded to the dtype where the two launches would store it."""
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    y = _normed(x, w_ptr, offs, mask, hidden, eps).to(y_ptr.dtype.element_ty).to(tl.float32)
    # the select keeps the compiler from contracting the scale and the add into an FMA in
    # fp32 (checked in the PTX), which would skip the rounding of y that two launches make
    y = tl.where(mask, y, 0.0)
    r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    s = (y + r).to(y_ptr.dtype.element_ty)
    tl.store(r_ptr + row * stride_r + offs, s, mask=mask)
    s = _normed(s.to(tl.float32), w_next_ptr, offs, mask, hidden, eps)
    tl.store(y_ptr + row * stride_y + offs, s.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, weight: torch.Tensor, op: str) -> torch.Tensor:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"{op}: weight shape {tuple(weight.shape)} does not match hidden "
                         f"size {hidden}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {hidden} exceeds {MAX_HIDDEN}")
    return x.reshape(-1, hidden)


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., H]``, ``weight [H]`` -> ``x / sqrt(mean(x^2) + eps) * weight`` in
    ``x.dtype`` (fp32 math), a new tensor. Raises ``ValueError`` on a weight/hidden mismatch."""
    x2 = _rows(x, weight, "rms_norm")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, weight, y, x2.stride(0), x2.stride(0), y.stride(0), x2.shape[1], float(eps),
            BLOCK=block, HAS_RESIDUAL=False, num_warps=_warps(block), **pdl_args(x.device))
    return y.view(x.shape)


def _in_place_rows(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, op: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, residual, x rows, residual rows)``: the buffers a residual norm writes in place
    (contiguous copies of non-contiguous inputs) and their ``[rows, hidden]`` views."""
    if not x.is_contiguous():
        x = x.contiguous()
    if not residual.is_contiguous():
        residual = residual.contiguous()
    x2 = _rows(x, weight, op)
    return x, residual, x2, residual.view(x2.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (rounded to ``x.dtype``); returns ``(rms_norm(r), r)``.

    In place: ``r`` is written into ``residual`` and the normalised rows into ``x`` (into
    contiguous copies when the inputs are not contiguous); the returned tensors are those
    buffers. Raises ``ValueError`` on mismatched shapes or dtypes."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"fused_add_rms_norm: x {x.dtype}{tuple(x.shape)} and residual "
                         f"{residual.dtype}{tuple(residual.shape)} differ")
    x, residual, x2, r2 = _in_place_rows(x, residual, weight, "fused_add_rms_norm")
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, x2, x2.stride(0), r2.stride(0), x2.stride(0), x2.shape[1],
            float(eps), BLOCK=block, HAS_RESIDUAL=True, num_warps=_warps(block),
            **pdl_args(x.device))
    return x, residual


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = rms_norm(x, weight)``, ``r = y + residual``; returns ``(rms_norm(r,
    next_weight), r)``, one launch, each step rounded to ``x.dtype`` as :func:`rms_norm`
    then :func:`fused_add_rms_norm` round it (same math, reduction layout and warps, so the
    results are bitwise theirs).

    In place: ``r`` is written into ``residual`` and the output rows into ``x`` (into
    contiguous copies when the inputs are not contiguous); the returned tensors are those
    buffers. Raises ``ValueError`` on mismatched shapes or dtypes."""
    check_norm_add_norm(x, residual, weight, next_weight)
    x, residual, x2, r2 = _in_place_rows(x, residual, weight, "norm_add_norm")
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _norm_add_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, next_weight, x2, x2.stride(0), r2.stride(0), x2.stride(0),
            x2.shape[1], float(eps), BLOCK=block, num_warps=_warps(block),
            **pdl_args(x.device))
    return x, residual


setattr(norm_add_norm, GRAPH_SAFE_ATTR, True)
