"""4-bit packing in int32 words, as the W4A16 formats store it.

``order[j]`` names the element of each group of eight that nibble ``j`` (bits ``4j..4j+3``)
holds: ``(0..7)`` for GPTQ and compressed-tensors, ``AWQ_ORDER`` for AWQ.
"""

from __future__ import annotations

import torch

_SHIFTS = tuple(range(0, 32, 4))
SEQUENTIAL: tuple[int, ...] = tuple(range(8))


def unpack(words: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """int32 words -> uint8 values 0..15, eight per word along ``dim``."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=words.device)
    nib = (w[..., None] >> shifts) & 0xF  # [..., m, 8], nibble j
    inverse = [order.index(e) for e in range(8)]
    out = nib[..., inverse].reshape(*w.shape[:-1], -1)
    return out.to(torch.uint8).movedim(-1, dim)


def pack(values: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """Inverse of :func:`unpack`: values 0..15 (size along ``dim`` a multiple of 8) -> int32."""
    v = values.movedim(dim, -1).to(torch.int64)
    if v.shape[-1] % 8:
        raise ValueError(f"cannot pack {v.shape[-1]} 4-bit values into int32 words")
    groups = v.reshape(*v.shape[:-1], -1, 8)[..., list(order)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=values.device)
    words = (groups << shifts).sum(dim=-1)
    words = words - ((words >> 31) & 1) * (1 << 32)
    return words.to(torch.int32).movedim(-1, dim)
