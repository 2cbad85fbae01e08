"""Rotary position embedding: the core builds the cos/sin cache, a kernel applies it."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.norm import RMSNorm
from heteroserve.core.layers.rotary_cache import build_cos_sin_cache


class RotaryEmbedding(nn.Module):
    """Applies ``dispatch.rotary_embedding`` with a cache of ``max_position`` rows; with
    per-head q/k norms first, ``dispatch.qk_norm_rotary`` (see :meth:`forward_qk_norm`)."""

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

    def forward_qk_norm(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        q_norm: RMSNorm, k_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [T, Hq, D]``, ``k [T, Hk, D]`` (strided views allowed, last dim contiguous)
        -> ``(rotary(q_norm(q)), rotary(k_norm(k)))`` with each head normed on its own;
        ``q``/``k`` may be overwritten. The norms' weights are their effective weights
        (Gemma's ``1 + w`` folded in at load) and they share one ``eps``. One op on every
        platform (where a vendor registers none, the torch-native fallback), so traces and
        graphs have the same structure everywhere."""
        return self.ctx.dispatch.qk_norm_rotary(q, k, q_norm.weight, k_norm.weight, q_norm.eps,
                                                positions, self.cos_sin_cache, self.is_neox)
