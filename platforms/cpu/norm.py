"""Torch-native RMSNorm and fused residual-add + RMSNorm (contracts in ``core/kernels/ops.py``).

Both go through aten's ``rms_norm``, which reduces and scales in fp32 and rounds once to the
input dtype, so bf16/fp16 inputs never take an fp32 round trip through memory.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., H]``, ``weight [H]`` -> ``x / sqrt(mean(x^2) + eps) * weight`` in ``x.dtype``.

    Computed in fp32. Raises ``ValueError`` when ``weight`` does not match the last dim."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match "
                         f"hidden size {x.shape[-1]}")
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    return torch.rms_norm(x, weight.shape, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (one rounding to ``x.dtype``); returns ``(rms_norm(r), r)``.

    In place: ``r`` is written into ``residual`` when it has ``x``'s dtype (the op contract
    allows it). Raises ``ValueError`` on mismatched shapes."""
    if x.shape != residual.shape:
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)} and residual "
                         f"{tuple(residual.shape)} differ in shape")
    if residual.dtype == x.dtype:
        r = residual.add_(x)
    else:
        r = (x.to(torch.float32) + residual.to(torch.float32)).to(x.dtype)
    return rms_norm(r, weight, eps), r
