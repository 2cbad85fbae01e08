"""Per-head q/k RMSNorm + rotary oracle: the RMSNorm and rotary oracles composed."""

from __future__ import annotations

import torch

from heteroserve.conformance.oracles.norm import rms_norm
from heteroserve.conformance.oracles.rotary import rotate


def qk_norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, positions: torch.Tensor,
                   cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """float64 ``rotate(rms_norm(x[t, h], weight))`` for ``x [T, H, D]``: each head's ``D``
    values normed on their own, then the first ``R`` dims rotated at ``positions``."""
    t, h, d = x.shape
    normed = rms_norm(x.reshape(t * h, d), weight, eps).view(t, h, d)
    return rotate(positions, normed, cache, is_neox)
