"""Torch-native rotary position embedding (contract: ``RotaryOp`` in ``core/kernels/ops.py``).

The cos/sin cache comes from :func:`heteroserve.core.layers.rotary_cache.build_cos_sin_cache`.
"""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate the first ``R = 2 * cos.shape[-1]`` dims of ``x [T, H, D]``; fp32 math."""
    rot_dim = 2 * cos.shape[-1]
    rot = x[..., :rot_dim].to(torch.float32)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    out = out.to(x.dtype)
    if rot_dim == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rot_dim:]], dim=-1)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` at ``positions`` (int ``[T]``).

    ``cos_sin_cache [max_position, R]`` holds ``[cos | sin]``; only the first ``R <= D`` dims
    of each head rotate (NeoX halves when ``is_neox``, else GPT-J interleaved pairs), the
    rest pass through. Returns new ``(q, k)`` in the input dtypes; inputs are not modified.
    Raises ``ValueError`` on inconsistent shapes (positions are not range-checked, to avoid a
    host sync).
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"rotary: q and k must be [T, H, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    rot_dim = cos_sin_cache.shape[-1]
    if rot_dim % 2 or rot_dim > q.shape[-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rotary: cache width {rot_dim} must be even and <= head size "
                         f"{q.shape[-1]} (k head size {k.shape[-1]})")
    if positions.shape != (q.shape[0],) or k.shape[0] != q.shape[0]:
        raise ValueError(f"rotary: positions {tuple(positions.shape)}, q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)} disagree on the token count")
    cos_sin = cos_sin_cache.index_select(0, positions.to(torch.long)).to(torch.float32)
    cos, sin = cos_sin.chunk(2, dim=-1)
    return _rotate(q, cos, sin, is_neox), _rotate(k, cos, sin, is_neox)
