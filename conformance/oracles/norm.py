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
