"""Dense attention and page gathering shared by the doubles (plain torch, fp32 on CPU)."""

from __future__ import annotations

import torch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
           causal: bool, window_left: int = -1, soft_cap: float = 0.0) -> torch.Tensor:
    """``q [Sq, Hq, D]`` over ``k, v [Sk, Hk, D]`` (GQA by head grouping), fp32 result.

    ``causal``: bottom-right aligned, query ``i`` sees keys ``j <= Sk - Sq + i``;
    ``window_left >= 0`` also hides keys ``j < Sk - Sq + i - window_left``; ``soft_cap > 0``
    maps scores ``s -> cap * tanh(s / cap)`` after scaling. Rows with no visible key give 0.
    """
    sq, hq, _ = q.shape
    sk, hk, _ = k.shape
    group = hq // hk
    kf = k.to(torch.float32).repeat_interleave(group, dim=1)
    vf = v.to(torch.float32).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(torch.float32), kf) * scale
    if soft_cap > 0:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    qi = torch.arange(sq)[:, None] + (sk - sq)
    kj = torch.arange(sk)[None, :]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible &= kj <= qi
    if window_left >= 0:
        visible &= kj >= qi - window_left
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, vf)


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int, layout: str
                 ) -> torch.Tensor:
    """The first ``length`` tokens stored in ``pages`` of a paged cache, ``[length, H, D]``.

    ``layout``: ``"NHD"`` ``[P, page, H, D]``, ``"HND"`` ``[P, H, page, D]`` or ``"BSH"``
    ``[P, page, H*D]`` (then the head split is left to the caller: ``[length, H*D]``)."""
    chosen = cache[pages.to(torch.long)]
    if layout == "HND":
        chosen = chosen.transpose(1, 2)
    return chosen.reshape(-1, *chosen.shape[2:])[:length]


def require(condition: bool, message: str) -> None:
    """Raise like a vendor kernel would on a layout/argument violation."""
    if not condition:
        raise ValueError(f"vendor double: {message}")
