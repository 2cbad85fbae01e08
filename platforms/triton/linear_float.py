"""Unquantized linear: ``y = x @ W^T + bias``; one row through the Triton GEMV (with the
feeding RMSNorm or SiLU-and-mul folded in when asked), more through torch (cuBLAS /
hipBLASLt / oneDNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from heteroserve.core.kernels.linear import LinearMethod
from heteroserve.platforms.triton.gemv import gemv, gemv_gated, gemv_rms_norm, gemv_silu_and_mul
from heteroserve.platforms.triton.linear_params import get_param


class UnquantizedLinear(LinearMethod):
    """``weight [N, K]`` in the model dtype. ``apply`` sends a single row (batch-1 decode, a
    pure weight stream) to :func:`~heteroserve.platforms.triton.gemv.gemv`, which reads the
    weight once with no split-K reduction, and anything larger to one ``F.linear`` (the
    vendor BLAS is the fastest GEMM for plain 16-bit weights). It fuses nothing (see
    :class:`PrologueFusedUnquantizedLinear`)."""

    scheme = "unquantized"

    def _weights(self, layer: torch.nn.Module, dtype: torch.dtype, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``(weight, bias, static)`` in ``dtype``; ``static`` is False when the weight had to
        be cast here (a fresh tensor a kernel just wrote, see ``gemv``'s ``static_weight``)."""
        weight = get_param(layer, "weight")
        static = weight.dtype == dtype
        if not static:
            weight = weight.to(dtype)
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return weight, bias, static

    @staticmethod
    def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return x.numel() == x.shape[-1] and weight.stride(1) == 1

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``; does not modify ``x``."""
        weight, bias, static = self._weights(layer, x.dtype, bias)
        if self._one_row(x, weight):
            return gemv(x, weight, bias, static_weight=static)
        return F.linear(x, weight, bias)

    def apply_upcast(self, layer: torch.nn.Module, x: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """One row of bf16/fp16 ``x`` into an fp32 layer: the GEMV reads ``x`` as it is
        (every load widens to fp32 anyway) and writes fp32; else None (the caller casts)."""
        weight = get_param(layer, "weight")
        if weight.dtype != torch.float32 or x.dtype not in (torch.bfloat16, torch.float16) \
                or not self._one_row(x, weight):
            return None
        if bias is not None and bias.dtype != weight.dtype:
            bias = bias.to(weight.dtype)
        return gemv(x, weight, bias, static_weight=True, out_dtype=weight.dtype)




class PrologueFusedUnquantizedLinear(UnquantizedLinear):
    """:class:`UnquantizedLinear` that also folds the feeding RMSNorm or SiLU-and-mul into
    the one-row GEMV, and the gated activation after a ``[gate | up]`` projection into it
    (registered as ``triton_fused``, below the plain one: on the H200 with PDL, batch-1
    decode ran at 237.6 tok/s with the plain GEMVs against 234.9 with the prologues; with the
    gated epilogue on the default method, 2026-12-05 05:08 UTC, Gemma-3-12B ran 82.5 % and
    Llama-3.1-8B 91.3 % of their rooflines, no better than the runs without it; see
    docs/benchmarks/log.md). More than one row: None, the caller runs the ops separately."""

    def apply_rms_norm(self, layer: torch.nn.Module, x: torch.Tensor,
                       residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                       bias: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One row: :func:`~heteroserve.platforms.triton.gemv.gemv_rms_norm`; else None."""
        weight, bias, static = self._weights(layer, x.dtype, bias)
        if not self._one_row(x, weight):
            return None
        return gemv_rms_norm(x, residual, norm_weight, eps, weight, bias, static_weight=static)

    def apply_silu_and_mul(self, layer: torch.nn.Module, x: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """One row: :func:`~heteroserve.platforms.triton.gemv.gemv_silu_and_mul`; else None."""
        weight, bias, static = self._weights(layer, x.dtype, bias)
        if not self._one_row(x, weight):
            return None
        return gemv_silu_and_mul(x, weight, bias, static_weight=static)

    def apply_gated(self, layer: torch.nn.Module, x: torch.Tensor, activation: str,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """One row: :func:`~heteroserve.platforms.triton.gemv.gemv_gated`; else None."""
        weight, bias, static = self._weights(layer, x.dtype, bias)
        if not self._one_row(x, weight):
            return None
        return gemv_gated(x, weight, activation, bias, static_weight=static)
