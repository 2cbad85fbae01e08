"""Unquantized linear: ``y = x @ W^T + bias`` through torch (cuBLAS / hipBLASLt / oneDNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.linear import LinearMethod
from heteroserve.platforms.triton.linear_params import get_param


class UnquantizedLinear(LinearMethod):
    """``weight [N, K]`` in the model dtype; ``apply`` is one ``F.linear`` (the vendor BLAS
    is already the fastest GEMM for plain 16-bit weights)."""

    scheme = "unquantized"


    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight = get_param(layer, "weight")
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
