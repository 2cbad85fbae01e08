"""Function ops on AMD GPUs through aiter (each follows its contract in ``core/kernels/ops.py``;
the aiter call and its layouts are written in the docstring)."""

from __future__ import annotations

import aiter
import torch
from aiter.fused_moe import fused_moe as _aiter_fused_moe


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``aiter.rms_norm(input [T, H], weight [H], epsilon)`` -> ``[T, H]`` in ``x.dtype``."""
    return aiter.rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``aiter.rmsnorm2d_fwd_with_add(out, input=x, residual_in=residual, residual_out,
    weight, epsilon)``: writes ``residual_out = x + residual`` and ``out = rms_norm(...)``."""
    out = torch.empty_like(x)
    summed = torch.empty_like(x)
    aiter.rmsnorm2d_fwd_with_add(out, x, residual, summed, weight, eps)
    return out, summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``aiter.silu_and_mul(out [T, I], input [T, 2I])``: ``silu(input[:, :I]) * input[:, I:]``
    written into ``out``."""
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    aiter.silu_and_mul(out, x)
    return out


def _cos_sin(cache: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[max_pos, R/2]`` cos and sin halves of the ``[cos | sin]`` cache in the query dtype,
    split once per cache tensor and kept on it (so their lifetime is the cache's)."""
    memo = cache.__dict__.setdefault("_heteroserve_cos_sin", {})
    if dtype not in memo:
        half = cache.shape[1] // 2
        memo[dtype] = (cache[:, :half].to(dtype).contiguous(),
                       cache[:, half:].to(dtype).contiguous())
    return memo[dtype]


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``aiter.rotary_embedding_fwd(positions [T], query [T, Hq, D], key [T, Hk, D],
    head_size, cos_cache [max_pos, R/2], sin_cache [max_pos, R/2], is_neox,
    is_nope_first=False)``: in place; the rotary width ``R`` is ``2 * cos_cache.shape[1]``
    and the dims after it pass through."""
    cos, sin = _cos_sin(cos_sin_cache, q.dtype)
    aiter.rotary_embedding_fwd(positions, q, k, q.shape[-1], cos, sin, is_neox, False)
    return q, k


def topk_softmax(router_logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``aiter.topk_softmax(topk_weights fp32 [T, k], topk_indices int32 [T, k],
    token_expert_indices int32 [T, k], gating_output fp32 [T, E], need_renorm)``, outputs
    written in place."""
    tokens = router_logits.shape[0]
    device = router_logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    token_expert = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    aiter.topk_softmax(weights, ids, token_expert, router_logits.to(torch.float32), renormalize)
    return weights, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``aiter.fused_moe.fused_moe(hidden_states [T, H], w1 [E, 2I, H] (gate rows first:
    gate_mode "separated"), w2 [E, H, I], topk_weight fp32 [T, k], topk_ids int32 [T, k],
    activation=ActivationType.Silu, quant_type=QuantType.No)`` -> ``[T, H]``. Weights are
    passed unshuffled (aiter's preshuffle-off path); see docs/platform-interface.md."""
    # the routing tensors may be strided views (op contract); aiter reads them densely
    return _aiter_fused_moe(x, w13, w2, topk_weights.to(torch.float32).contiguous(),
                            topk_ids.to(torch.int32).contiguous(),
                            activation=aiter.ActivationType.Silu,
                            quant_type=aiter.QuantType.No)
