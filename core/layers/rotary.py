"""Rotary position embedding: the core builds the cos/sin cache, a kernel applies it."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.rotary_cache import build_cos_sin_cache


class RotaryEmbedding(nn.Module):
    """Applies ``dispatch.rotary_embedding`` with a cache of ``max_position`` rows."""

    def __init__(self, ctx: LayerContext, rotary_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None, is_neox: bool = True) -> None:
        super().__init__()
        self.ctx, self.is_neox = ctx, is_neox
        cache = build_cos_sin_cache(rotary_dim, max_position, base, rope_scaling)
        self.register_buffer("cos_sin_cache", cache.to(ctx.device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctx.dispatch.rotary_embedding(positions, q, k, self.cos_sin_cache,
                                                  self.is_neox)
