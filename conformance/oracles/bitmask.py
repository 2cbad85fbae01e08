"""Token-bitmask oracle (xgrammar's layout)."""

from __future__ import annotations

import torch


def allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool ``[M, V]``: token ``t`` of row ``i`` is allowed iff bit ``t % 32`` of word
    ``t // 32`` is set; tokens at or beyond ``32 * W`` are not."""
    words = bitmask.cpu().to(torch.int64) & 0xFFFFFFFF
    bits = ((words[..., None] >> torch.arange(32)) & 1).bool().reshape(words.shape[0], -1)
    out = torch.zeros(words.shape[0], vocab_size, dtype=torch.bool)
    width = min(vocab_size, bits.shape[1])
    out[:, :width] = bits[:, :width]
    return out


def apply(logits: torch.Tensor, bitmask: torch.Tensor,
          indices: torch.Tensor | None) -> torch.Tensor:
    """Float64 logits after masking: row ``indices[i]`` (or ``i``) keeps the tokens row ``i``
    of the bitmask allows and becomes ``-inf`` elsewhere; unlisted rows are unchanged."""
    out = logits.double().cpu().clone()
    ok = allowed(bitmask, logits.shape[-1])
    rows = indices.cpu().tolist() if indices is not None else list(range(bitmask.shape[0]))
    for i, row in enumerate(rows):
        out[row] = out[row].masked_fill(~ok[i], float("-inf"))
    return out
