"""Paged-attention oracle over dense per-sequence K/V."""

from __future__ import annotations

import math

import torch


def attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
              extend_lens: list[int], scale: float, sliding_window: int | None = None,
              logit_cap: float | None = None) -> torch.Tensor:
    """Causal attention of new tokens over their sequences, in float64.

    ``q [T, Hq, D]`` holds each sequence's ``extend_lens[b]`` new tokens in order; ``keys[b]``
    and ``values[b]`` are ``[L_b, Hkv, D]`` (the whole sequence, prefix and new tokens). New
    token ``i`` of sequence ``b`` sits at position ``L_b - extend_lens[b] + i`` and sees keys at
    positions ``p - w < k <= p`` (``w`` = ``sliding_window``, unbounded when None). Scores are
    ``scale * q.k``, then ``cap * tanh(score / cap)`` with a ``logit_cap``. Query head ``h``
    reads KV head ``h // (Hq // Hkv)``.
    """
    q = q.double().cpu()
    hq = q.shape[1]
    out = torch.empty_like(q)
    row = 0
    for k, v, n in zip(keys, values, extend_lens):
        k, v = k.double().cpu(), v.double().cpu()
        length, hkv = k.shape[0], k.shape[1]
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        qs = q[row: row + n]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        if logit_cap:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        pos = torch.arange(length - n, length)[:, None]
        kpos = torch.arange(length)[None, :]
        visible = kpos <= pos
        if sliding_window:
            visible &= kpos > pos - sliding_window
        scores = scores.masked_fill(~visible[None], -math.inf)
        out[row: row + n] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
        row += n
    return out
