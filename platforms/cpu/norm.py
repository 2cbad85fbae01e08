"""Torch-native RMSNorm, fused residual-add + RMSNorm and the RMSNorm / add / RMSNorm sequence
(contracts in ``core/kernels/ops.py``).

They go through aten's ``rms_norm``, which reduces and scales in fp32 and rounds once to the
input dtype, so bf16/fp16 inputs never take an fp32 round trip through memory.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.ops import GRAPH_SAFE_ATTR


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


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  next_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = rms_norm(x, weight)``, ``r = y + residual``: returns ``(rms_norm(r, next_weight),
    r)``, each step rounded to ``x.dtype`` (the two ops above in sequence, so the rounding is
    theirs by construction). In place: ``r`` is written into ``residual``. Raises
    ``ValueError`` on mismatched shapes or dtypes."""
    check_norm_add_norm(x, residual, weight, next_weight)
    return fused_add_rms_norm(rms_norm(x, weight, eps), residual, next_weight, eps)


def check_norm_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        next_weight: torch.Tensor) -> None:
    """The ``norm_add_norm`` contract's input checks; raises ``ValueError``."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"norm_add_norm: x {x.dtype}{tuple(x.shape)} and residual "
                         f"{residual.dtype}{tuple(residual.shape)} differ")
    if weight.shape != x.shape[-1:] or next_weight.shape != x.shape[-1:]:
        raise ValueError(f"norm_add_norm: weights {tuple(weight.shape)} and "
                         f"{tuple(next_weight.shape)} do not match hidden size {x.shape[-1]}")


setattr(norm_add_norm, GRAPH_SAFE_ATTR, True)
