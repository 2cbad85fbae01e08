"""Torch-native token-bitmask application (contract: ``TokenBitmaskApplyOp``)."""

from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 ``[M, W]`` (bit ``t % 32`` of word ``t // 32`` allows token ``t``) -> bool
    ``[M, vocab]``; columns ``>= 32 * W`` are disallowed."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    bits = ((bitmask[:, :, None] >> shifts) & 1).to(torch.bool).flatten(1)
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    pad = torch.zeros((bits.shape[0], vocab - bits.shape[1]), dtype=torch.bool,
                      device=bitmask.device)
    return torch.cat([bits, pad], dim=1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: torch.Tensor | None = None) -> None:
    """In place: disallowed tokens of ``logits [B, V]`` become ``-inf``; allowed ones are
    untouched. Bitmask row ``i`` applies to logits row ``indices[i]`` (all rows in order
    when ``indices`` is None, then ``M == B``). Raises ``ValueError`` on a wrong dtype or
    shape."""
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"token bitmask must be int32 [M, W], got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be float [B, V], got {logits.dtype} {tuple(logits.shape)}")
    allowed = unpack_bitmask(bitmask, logits.shape[1])
    if indices is None:
        if bitmask.shape[0] != logits.shape[0]:
            raise ValueError(f"bitmask has {bitmask.shape[0]} rows but logits have "
                             f"{logits.shape[0]} and no indices were given")
        logits.masked_fill_(~allowed, float("-inf"))
        return
    if indices.shape != (bitmask.shape[0],):
        raise ValueError(f"indices must be [{bitmask.shape[0]}], got {tuple(indices.shape)}")
    rows = indices.to(torch.long)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
