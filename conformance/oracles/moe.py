"""Mixture-of-experts oracles: routing (top-k softmax, grouped top-k) and the expert MLPs."""

from __future__ import annotations

import torch

from heteroserve.conformance.oracles.activation import silu_and_mul


def topk_softmax(logits: torch.Tensor, top_k: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, E]`` -> float64 weights ``[T, k]`` and int64 ids ``[T, k]``: the ``k`` largest
    softmax probabilities, descending, ties to the lower expert id."""
    probs = torch.softmax(logits.double().cpu(), dim=-1)
    order = torch.sort(-probs, dim=-1, stable=True).indices[:, :top_k]
    weights = probs.gather(1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order


def _gap(sorted_desc: torch.Tensor, k: int) -> float:
    """Smallest gap between the ``k``-th and ``k+1``-th values of each row (inf if none)."""
    if sorted_desc.shape[-1] <= k:
        return float("inf")
    return float((sorted_desc[:, k - 1] - sorted_desc[:, k]).min())


def grouped_topk(logits: torch.Tensor, top_k: int, renormalize: bool, num_expert_group: int,
                 topk_group: int, scoring: str, correction_bias: torch.Tensor | None,
                 routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """DeepSeek-style routing (see ``ops.GroupedTopKOp``) in float64.

    Returns ``(weights [T, k], ids [T, k], margin)`` with rows sorted by expert id; ``margin``
    is the smallest score gap at any selection boundary (group or expert), so cases can avoid
    inputs whose answer hinges on rounding.
    """
    x = logits.double().cpu()
    if scoring == "softmax":
        scores = torch.softmax(x, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(x)
    else:
        raise ValueError(f"scoring must be softmax or sigmoid, got {scoring!r}")
    biased = scores if correction_bias is None else scores + correction_bias.double().cpu()
    t, e = x.shape
    grouped = biased.view(t, num_expert_group, e // num_expert_group)
    if correction_bias is None:
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    gsorted = torch.sort(group_scores, dim=-1, descending=True, stable=True)
    keep_groups = gsorted.indices[:, :topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask.repeat_interleave(e // num_expert_group, dim=1)
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    esorted = torch.sort(masked, dim=-1, descending=True, stable=True)
    ids = esorted.indices[:, :top_k]
    margin = min(_gap(gsorted.values, topk_group), _gap(esorted.values, top_k))
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * routed_scaling_factor
    order = ids.sort(dim=-1).indices
    return weights.gather(1, order), ids.gather(1, order), margin


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """float64 ``out[t] = sum_j w[t, j] * w2[e] @ silu_and_mul(w13[e] @ x[t])``."""
    x, w13, w2 = x.double().cpu(), w13.double().cpu(), w2.double().cpu()
    weights, ids = topk_weights.double().cpu(), topk_ids.cpu().long()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for expert in ids.unique().tolist():
        rows, slots = (ids == expert).nonzero(as_tuple=True)
        hidden = silu_and_mul(x[rows] @ w13[expert].T)
        out.index_add_(0, rows, (hidden @ w2[expert].T) * weights[rows, slots, None])
    return out
