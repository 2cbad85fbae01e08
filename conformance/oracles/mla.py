"""Multi-head latent attention oracle over dense per-sequence latents (float64)."""

from __future__ import annotations

import math

import torch


def mla(q_nope: torch.Tensor, q_pe: torch.Tensor, latents: list[torch.Tensor],
        k_pes: list[torch.Tensor], w_kc: torch.Tensor, w_vc: torch.Tensor,
        extend_lens: list[int], scale: float) -> torch.Tensor:
    """Causal MLA of new tokens over their sequences, in float64, by explicit up-projection.

    ``q_nope [T, H, dn]`` and ``q_pe [T, H, r]`` hold each sequence's ``extend_lens[b]`` new
    tokens in order; ``latents[b] [L_b, c]`` and ``k_pes[b] [L_b, r]`` are the whole sequence.
    Keys per head are ``[w_kc[h] @ latent | k_pe]``, values ``w_vc[h] @ latent``; new token
    ``i`` of sequence ``b`` (position ``L_b - n_b + i``) sees positions ``<=`` its own.
    Returns ``[T, H, dv]`` float64 on the host.
    """
    qn, qp = q_nope.double().cpu(), q_pe.double().cpu()
    wk, wv = w_kc.double().cpu(), w_vc.double().cpu()
    out = torch.empty(qn.shape[0], qn.shape[1], wv.shape[1], dtype=torch.float64)
    row = 0
    for latent, k_pe, n in zip(latents, k_pes, extend_lens):
        latent, k_pe = latent.double().cpu(), k_pe.double().cpu()
        length = latent.shape[0]
        k_nope = torch.einsum("lc,hdc->lhd", latent, wk)
        v = torch.einsum("lc,hdc->lhd", latent, wv)
        scores = (torch.einsum("qhd,khd->hqk", qn[row:row + n], k_nope)
                  + torch.einsum("qhr,kr->hqk", qp[row:row + n], k_pe)) * scale
        pos = torch.arange(length - n, length)[:, None]
        visible = torch.arange(length)[None, :] <= pos
        scores = scores.masked_fill(~visible[None], -math.inf)
        out[row:row + n] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
        row += n
    return out
