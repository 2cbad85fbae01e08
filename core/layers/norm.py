"""RMSNorm through the dispatch table."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.layers.context import LayerContext


class RMSNorm(nn.Module):
    """``forward(x)`` -> normed; ``forward(x, residual)`` -> ``(normed, x + residual)``;
    ``forward_add_norm(x, residual, next_norm)`` -> ``(next_norm(normed + residual),
    normed + residual)``."""

    def __init__(self, ctx: LayerContext, size: int, eps: float) -> None:
        super().__init__()
        self.ctx, self.eps = ctx, eps
        self.weight = nn.Parameter(torch.ones(size, dtype=ctx.dtype, device=ctx.device),
                                   requires_grad=False)

    def load(self, name: str, tensor: torch.Tensor, shard: object = None) -> None:
        self.weight.data.copy_(tensor.to(self.weight.dtype))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ctx.dispatch.rms_norm(x, self.weight, self.eps)
        return self.ctx.dispatch.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``r = self(x) + residual``; returns ``(next_norm(r), r)`` in one op
        (``dispatch.norm_add_norm``, rounded as the two calls would be); ``x`` and
        ``residual`` may be overwritten. Raises ``ValueError`` when the norms' ``eps``
        differ (the op takes one)."""
        if next_norm.eps != self.eps:
            raise ValueError(f"norm_add_norm: eps {self.eps} and {next_norm.eps} differ")
        return self.ctx.dispatch.norm_add_norm(x, residual, self.weight, next_norm.weight,
                                               self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm, ``x / rms(x) * (1 + w)``: the checkpoint stores ``w`` and ``load``
    keeps ``1 + w`` (added in fp32, then rounded to the parameter dtype), so the plain
    ``rms_norm`` op computes it. In bf16 the rounding of ``1 + w`` is the only difference
    from computing ``1 + w`` in fp32 on every call."""

    def load(self, name: str, tensor: torch.Tensor, shard: object = None) -> None:
        self.weight.data.copy_((tensor.to(torch.float32) + 1.0).to(self.weight.dtype))
