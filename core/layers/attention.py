"""The attention layer: q/k/v in, paged attention through the engine's backend, o out."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from heteroserve.core.kernels.attention import AttentionLayer, AttentionPrologue
from heteroserve.core.layers.context import ForwardContext


class PagedAttention(nn.Module):
    """Per-layer parameters for the backend; ``forward`` takes flat ``q [T, Hq*D]`` and
    ``k, v [T, Hkv*D]`` and returns ``[T, Hq*D]``.

    Per-layer K/V scales (a checkpoint's ``self_attn.k_scale`` / ``v_scale``, for an fp8 KV
    cache; 1.0 otherwise) are applied around the backend, which stores and reads cached
    values unscaled: this layer writes ``k / k_scale`` and ``v / v_scale``, attends with
    ``scale * k_scale`` and multiplies the output by ``v_scale``."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_size: int,
                 scale: float, sliding_window: int | None = None,
                 logit_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = scale
        self.k_scale = self.v_scale = 1.0
        self.params = AttentionLayer(layer_id, scale, sliding_window, logit_cap)

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """Use per-layer K/V cache scales (positive, finite). Raises ``ValueError``."""
        for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not 0.0 < value < float("inf"):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        self.k_scale, self.v_scale = k_scale, v_scale
        self.params = replace(self.params, scale=self.scale * k_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fwd: ForwardContext) -> torch.Tensor:
        t = q.shape[0]
        lid = self.params.layer_id
        if self.k_scale != 1.0:
            k = k / self.k_scale
        if self.v_scale != 1.0:
            v = v / self.v_scale
        out = fwd.backend.forward(
            q.view(t, self.num_heads, self.head_size),
            k.view(t, self.num_kv_heads, self.head_size),
            v.view(t, self.num_kv_heads, self.head_size),
            fwd.k_caches[lid], fwd.v_caches[lid], self.params, fwd.meta)
        out = out.reshape(t, self.num_heads * self.head_size)
        return out * self.v_scale if self.v_scale != 1.0 else out

    def forward_prologue(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prologue: AttentionPrologue, fwd: ForwardContext) -> torch.Tensor | None:
        """:meth:`forward` of un-normed, un-rotated ``q [T, Hq, D]`` / ``k [T, Hk, D]``
        (strided views allowed) with ``v [T, Hk*D]``, the backend applying ``prologue``
        (:meth:`AttentionBackend.forward_prologue`); ``[T, Hq*D]``, or None where the backend
        does not fold it or per-layer K/V scales apply (the caller then runs the ops and
        :meth:`forward`)."""
        if self.k_scale != 1.0 or self.v_scale != 1.0:
            return None
        t, lid = q.shape[0], self.params.layer_id
        out = fwd.backend.forward_prologue(
            q, k, v.view(t, self.num_kv_heads, self.head_size), fwd.k_caches[lid],
            fwd.v_caches[lid], self.params, fwd.meta, prologue)
        return None if out is None else out.reshape(t, self.num_heads * self.head_size)
