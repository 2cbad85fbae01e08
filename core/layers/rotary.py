"""Rotary position embedding: the core builds the cos/sin cache, a kernel applies it."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels import ops
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
        dispatch = ctx.dispatch
        # the fused op unless it would be the torch-native fallback in place of a
        # platform's own norm or rotary kernels (then those two, as before the fused op)
        self.fuse_qk_norm = dispatch.is_native(ops.QK_NORM_ROTARY) or not (
            dispatch.is_native(ops.RMS_NORM) or dispatch.is_native(ops.ROTARY))

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctx.dispatch.rotary_embedding(positions, q, k, self.cos_sin_cache,
                                                  self.is_neox)

    def forward_qk_norm(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                        q_norm: RMSNorm, k_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``q [T, Hq, D]``, ``k [T, Hk, D]`` (strided views allowed, last dim contiguous)
        -> ``(rotary(q_norm(q)), rotary(k_norm(k)))`` with each head normed on its own;
        ``q``/``k`` may be overwritten. The norms' weights are their effective weights
        (Gemma's ``1 + w`` folded in at load) and they share one ``eps``."""
        if self.fuse_qk_norm:
            return self.ctx.dispatch.qk_norm_rotary(
                q, k, q_norm.weight, k_norm.weight, q_norm.eps, positions, self.cos_sin_cache,
                self.is_neox)
        t, d = q.shape[0], q.shape[-1]
        q = q_norm(q.reshape(-1, d)).view(t, -1, d)
        k = k_norm(k.reshape(-1, d)).view(t, -1, d)
        return self.forward(positions, q, k)
