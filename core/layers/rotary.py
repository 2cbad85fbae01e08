"""Rotary position embedding: the core builds the cos/sin cache, a kernel applies it."""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from heteroserve.core.kernels.attention import AttentionPrologue
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.norm import RMSNorm
from heteroserve.core.layers.rotary_cache import build_cos_sin_cache


#: (rotary_dim, max_position, base, rope_scaling as JSON, device) -> the device cache; weak,
#: so a cache lives as long as a model holds it
_SHARED_CACHES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def shared_cos_sin_cache(rotary_dim: int, max_position: int, base: float,
                         rope_scaling: Mapping[str, Any] | None,
                         device: torch.device) -> torch.Tensor:
    """One ``[max_position, rotary_dim]`` fp32 cache on ``device`` per distinct set of rotary
    parameters, shared by every layer (and model) that asks for it while one holds it: a
    Llama-3.1 layer's cache is 64 MiB (131,072 positions x 128), so one per layer would take 2
    GiB of device memory from the KV pool. Read-only for its users (kernels index it);
    errors as :func:`build_cos_sin_cache`."""
    key = (rotary_dim, max_position, float(base),
           json.dumps(rope_scaling, sort_keys=True, default=str), str(torch.device(device)))
    cache = _SHARED_CACHES.get(key)
    if cache is None:
        cache = build_cos_sin_cache(rotary_dim, max_position, base, rope_scaling).to(device)
        _SHARED_CACHES[key] = cache
    return cache


class RotaryEmbedding(nn.Module):
    """Applies ``dispatch.rotary_embedding`` with a cache of ``max_position`` rows; with
    per-head q/k norms first, ``dispatch.qk_norm_rotary`` (see :meth:`forward_qk_norm`)."""

    def __init__(self, ctx: LayerContext, rotary_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None, is_neox: bool = True) -> None:
        super().__init__()
        self.ctx, self.is_neox = ctx, is_neox
        cache = shared_cos_sin_cache(rotary_dim, max_position, base, rope_scaling, ctx.device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

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

    def prologue(self, positions: torch.Tensor, q_norm: RMSNorm | None = None,
                 k_norm: RMSNorm | None = None) -> AttentionPrologue:
        """This rotation at ``positions``, after the per-head ``q_norm`` / ``k_norm`` where
        the model has them (both or neither; their effective weights and ``q_norm``'s eps),
        for an attention backend that folds them in
        (:meth:`~heteroserve.core.kernels.attention.AttentionBackend.forward_prologue`)."""
        if q_norm is None or k_norm is None:
            return AttentionPrologue(positions, self.cos_sin_cache, self.is_neox)
        return AttentionPrologue(positions, self.cos_sin_cache, self.is_neox, q_norm.weight,
                                 k_norm.weight, q_norm.eps)
