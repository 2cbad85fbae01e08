"""Float64 references and helpers for the Triton kernel tests in ``tests/triton``."""

from __future__ import annotations

import math

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64 on the host (inf when out has NaN)."""
    o, r = out.double().cpu(), ref.double().cpu()
    if torch.isnan(o).any():
        return math.inf
    return float((o - r).abs().max() / r.abs().max().clamp(min=1e-30))


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  scale: float, window: int | None, cap: float | None) -> torch.Tensor:
    """Dense float64 attention of one sequence: ``q [n, Hq, D]`` at positions ``q_pos [n]``
    over ``k/v [L, Hk, D]`` (positions ``0..L-1``), causal, GQA, window, soft cap."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    hq, hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    kp = torch.arange(k.shape[0])[None, :]
    qp = q_pos.cpu()[:, None]
    allowed = kp <= qp
    if window is not None:
        allowed &= kp > qp - window
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
