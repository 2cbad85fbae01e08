"""Torch-native per-head q/k RMSNorm + rotary (contract: ``QKNormRotaryOp`` in
``core/kernels/ops.py``): literally this platform's ``rms_norm`` followed by its
``apply_rotary``, so the fused op and the two ops agree bit for bit."""

from __future__ import annotations

import torch

from heteroserve.core.kernels.ops import GRAPH_SAFE_ATTR
from heteroserve.platforms.cpu.norm import rms_norm
from heteroserve.platforms.cpu.rotary import apply_rotary


def check_qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                         k_weight: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``q [T, Hq, D]`` and ``k [T, Hk, D]`` share ``T``, ``D``
    and dtype and both weights are ``[D]`` (the rotary checks of cache and positions are the
    rotary op's)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"qk_norm_rotary: q and k must be [T, H, D], got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.dtype != k.dtype:
        raise ValueError(f"qk_norm_rotary: q {q.dtype}{tuple(q.shape)} and k "
                         f"{k.dtype}{tuple(k.shape)} differ in tokens, head size or dtype")
    d = q.shape[2]
    if q_weight.shape != (d,) or k_weight.shape != (d,):
        raise ValueError(f"qk_norm_rotary: weights {tuple(q_weight.shape)} and "
                         f"{tuple(k_weight.shape)} must both be [{d}]")


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                   cos_sin_cache: torch.Tensor, is_neox: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm each head of ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (fp32 math, rounded to the
    dtype), then rotate the first ``R`` dims at ``positions`` with ``cos_sin_cache
    [max_position, R]``. Returns new contiguous ``(q, k)``; the inputs (any strides) are not
    modified. Raises ``ValueError`` on inconsistent shapes or dtypes."""
    check_qk_norm_rotary(q, k, q_weight, k_weight)
    return apply_rotary(positions, rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps),
                        cos_sin_cache, is_neox)


# no host synchronisation: a device graph may capture it
setattr(qk_norm_rotary, GRAPH_SAFE_ATTR, True)
