"""RMSNorm oracles."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [T, H]``, ``weight [H]`` -> float64 ``x / sqrt(mean(x^2) + eps) * weight``."""
    x, w = x.double().cpu(), weight.double().cpu()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(rms_norm(x + residual), x + residual)``."""
    r = x.double().cpu() + residual.double().cpu()
    return rms_norm(r, weight, eps), r


def norm_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  next_weight: torch.Tensor, eps: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(rms_norm(r, next_weight), r)`` with ``r = rms_norm(x, weight) + residual``,
    the normed ``x`` and ``r`` rounded to ``dtype`` where the op's contract rounds them."""
    y = rms_norm(x, weight, eps).to(dtype).double()
    r = (y + residual.double().cpu()).to(dtype).double()
    return rms_norm(r, next_weight, eps), r
