"""Adapters from the heteroserve op contracts (``heteroserve.plugin_api``: ``RMSNormOp``, ...)
to your vendor library. Keep each adapter a thin translation of shapes, dtypes and layouts."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Contract: ``heteroserve.plugin_api.RMSNormOp``. Replace the body with your library's
    fused kernel."""
    import torch_myvendor  # type: ignore[import-not-found]

    return torch_myvendor.rms_norm(x, weight, eps)
