"""Torch-native RMSNorm and fused residual-add + RMSNorm (contracts in ``core/kernels/ops.py``)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., H]``, ``weight [H]`` -> ``x / sqrt(mean(x^2) + eps) * weight`` in ``x.dtype``.

    Computed in fp32. Raises ``ValueError`` when ``weight`` does not match the last dim."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match "
                         f"hidden size {x.shape[-1]}")
    xf = x.to(torch.float32)
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * inv_rms * weight.to(torch.float32)).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (rounded to ``x.dtype``); returns ``(rms_norm(r), r)``.

    Does not modify its inputs. Raises ``ValueError`` on mismatched shapes."""
    if x.shape != residual.shape:
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)} and residual "
                         f"{tuple(residual.shape)} differ in shape")
    r = (x.to(torch.float32) + residual.to(torch.float32)).to(x.dtype)
    return rms_norm(r, weight, eps), r
