"""Unquantized linear weights prepacked once for oneDNN.

A plain ``F.linear`` on CPU hands oneDNN (or MKL) a row-major ``[N, K]`` weight on every
call, which it reorders into its blocked layout each time; at decode batch sizes that reorder
costs more than the product itself. :func:`prepack_weight` does the reorder once, at load, and
:func:`packed_linear` multiplies against the packed tensor (an opaque ``torch._mkldnn`` tensor:
only oneDNN reads it). Results equal ``F.linear``'s to rounding: same accumulation in fp32.

Packing applies to CPU weights in a dtype oneDNN runs natively
(:meth:`~heteroserve.platforms.cpu.features.CpuFeatures.prepack_dtypes`); everything else stays
as loaded, and the caller keeps using ``F.linear``.
"""

from __future__ import annotations

import torch

from heteroserve.platforms.cpu.features import detect_cpu_features

#: The row count oneDNN chooses the packed layout for. bf16 favours the one-row decode step,
#: fp32 a small batch (measured on an AVX512-BF16 host; any row count stays correct).
_LAYOUT_ROWS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 16}


def prepack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of ``weight [N, K]``, or None where packing does not apply
    (not a 2-D CPU tensor, oneDNN absent, or a dtype oneDNN would emulate)."""
    if (weight.device.type != "cpu" or weight.dim() != 2 or weight.is_mkldnn
            or weight.dtype not in detect_cpu_features().prepack_dtypes()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(),
                                                   _LAYOUT_ROWS[weight.dtype])


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ W^T + bias`` against ``packed = prepack_weight(W)``; returns ``[..., N]``
    in ``x.dtype`` (``x`` is cast to the weight's dtype for the product when they differ)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.dtype != packed.dtype:
        x2 = x2.to(packed.dtype)
    if bias is not None and bias.dtype != packed.dtype:
        bias = bias.to(packed.dtype)
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
