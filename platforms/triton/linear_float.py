"""Unquantized linear: ``y = x @ W^T + bias``; one row through the Triton GEMV, more through
torch (cuBLAS / hipBLASLt / oneDNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.linear import LinearMethod
from heteroserve.platforms.triton.gemv import gemv
from heteroserve.platforms.triton.linear_params import get_param


class UnquantizedLinear(LinearMethod):
    """``weight [N, K]`` in the model dtype. ``apply`` sends a single row (batch-1 decode, a
    pure weight stream) to :func:`~heteroserve.platforms.triton.gemv.gemv`, which reads the
    weight once with no split-K reduction, and anything larger to one ``F.linear`` (the
    vendor BLAS is the fastest GEMM for plain 16-bit weights)."""

    scheme = "unquantized"

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight = get_param(layer, "weight")
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if x.numel() == x.shape[-1] and weight.stride(1) == 1:
            return gemv(x, weight, bias)
        return F.linear(x, weight, bias)
