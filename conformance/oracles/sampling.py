"""Sampling oracles: the greedy answer and the set of tokens a sampled row may return."""

from __future__ import annotations

import torch

#: slack for comparisons made in fp32 by implementations (cases keep far larger margins)
_EPS = 1e-6


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: the argmax of each row, the lowest id among equal maxima."""
    x = logits.double().cpu()
    best = x.max(dim=-1, keepdim=True).values
    ids = torch.arange(x.shape[-1]).expand_as(x)
    return torch.where(x == best, ids, x.shape[-1]).min(dim=-1).values


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 softmax of ``logits [V] / temperature`` (``-inf`` -> probability 0)."""
    return torch.softmax(logits.double().cpu() / temperature, dim=-1)


def support(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
            min_p: float) -> torch.Tensor:
    """bool ``[V]``: tokens of one row that pass every active filter (``top_k <= 0``,
    ``top_p >= 1``, ``min_p <= 0`` mean off) on the temperature-scaled distribution, and have
    a finite logit. Ties at a boundary are allowed on either side, and top-p is computed on
    the full distribution (a superset of top-p after top-k renormalisation), so the set is
    the most lenient reading of the contract."""
    probs = probabilities(logits, temperature)
    keep = torch.isfinite(logits.double().cpu()) & (probs > 0)
    sorted_p = torch.sort(probs, descending=True).values
    if top_k > 0 and top_k < probs.numel():
        keep &= probs >= sorted_p[top_k - 1] - _EPS
    if top_p < 1.0:
        before = torch.cumsum(sorted_p, 0) - sorted_p
        last = int((before < top_p + _EPS).sum()) - 1
        keep &= probs >= sorted_p[max(last, 0)] - _EPS
    if min_p > 0.0:
        keep &= probs >= min_p * probs.max() - _EPS
    return keep


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 min_p: float) -> torch.Tensor:
    """float64 ``[V]``: the distribution a sampled row draws from, the temperature-scaled
    softmax restricted to :func:`support` and renormalised. Exact only where no token sits
    on a filter's boundary (the statistical cases keep wide margins)."""
    probs = probabilities(logits, temperature)
    kept = probs * support(logits, temperature, top_k, top_p, min_p)
    return kept / kept.sum()
