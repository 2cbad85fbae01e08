"""Rotary position embedding oracles."""

from __future__ import annotations

import torch


def cos_sin_cache(max_position: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """float64 ``[max_position, rotary_dim]`` = ``[cos | sin]`` of the standard RoPE
    frequencies ``base^(-2i / rotary_dim)``."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rotate(positions: torch.Tensor, x: torch.Tensor, cache: torch.Tensor,
           is_neox: bool) -> torch.Tensor:
    """``x [T, H, D]`` rotated by ``cache[positions]`` (``[T, R]``) in float64: the first
    ``R`` dims of each head rotate (neox halves or GPT-J interleaved pairs), the rest pass."""
    x = x.double().cpu().clone()
    cs = cache.double().cpu()[positions.cpu().long()]
    rot = cs.shape[-1]
    cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2:]
    if is_neox:
        x1, x2 = x[..., : rot // 2].clone(), x[..., rot // 2: rot].clone()
        x[..., : rot // 2] = x1 * cos - x2 * sin
        x[..., rot // 2: rot] = x2 * cos + x1 * sin
    else:
        x1, x2 = x[..., 0:rot:2].clone(), x[..., 1:rot:2].clone()
        x[..., 0:rot:2] = x1 * cos - x2 * sin
        x[..., 1:rot:2] = x2 * cos + x1 * sin
    return x
