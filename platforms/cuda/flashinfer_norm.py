"""RMSNorm and fused add+RMSNorm through flashinfer's fused CUDA kernels (contracts in
``core/kernels/ops.py``); flashinfer is imported on first call."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., H]`` (bf16/fp16), ``weight [H]`` -> RMSNorm in ``x.dtype`` (fp32 math), new
    tensor. Raises ``ValueError`` on a weight/hidden mismatch."""
    from flashinfer.norm import rmsnorm  # noqa: PLC0415

    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden "
                         f"size {x.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return rmsnorm(x2, weight.to(x.dtype), eps).view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual``; returns ``(rms_norm(r), r)``. In place: flashinfer writes ``r``
    into ``residual`` and the normalised rows into ``x`` (contiguous copies of
    non-contiguous inputs). Raises ``ValueError`` on mismatched shapes."""
    from flashinfer.norm import fused_add_rmsnorm  # noqa: PLC0415

    if x.shape != residual.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"fused_add_rms_norm: x {tuple(x.shape)}, residual "
                         f"{tuple(residual.shape)} and weight {tuple(weight.shape)} disagree")
    x = x.contiguous()
    residual = residual.contiguous()
    fused_add_rmsnorm(x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1]),
                      weight.to(x.dtype), eps)
    return x, residual
