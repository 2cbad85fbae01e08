"""The attention layer: q/k/v in, paged attention through the engine's backend, o out."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels.attention import AttentionLayer
from heteroserve.core.layers.context import ForwardContext


class PagedAttention(nn.Module):
    """Per-layer parameters for the backend; ``forward`` takes flat ``q [T, Hq*D]`` and
    ``k, v [T, Hkv*D]`` and returns ``[T, Hq*D]``."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_size: int,
                 scale: float, sliding_window: int | None = None,
                 logit_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.params = AttentionLayer(layer_id, scale, sliding_window, logit_cap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fwd: ForwardContext) -> torch.Tensor:
        t = q.shape[0]
        lid = self.params.layer_id
        out = fwd.backend.forward(
            q.view(t, self.num_heads, self.head_size),
            k.view(t, self.num_kv_heads, self.head_size),
            v.view(t, self.num_kv_heads, self.head_size),
            fwd.k_caches[lid], fwd.v_caches[lid], self.params, fwd.meta)
        return out.reshape(t, self.num_heads * self.head_size)
