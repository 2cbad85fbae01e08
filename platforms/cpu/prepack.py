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


def is_packed(weight: torch.Tensor) -> bool:
    return weight.is_mkldnn


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ W^T + bias`` against ``packed = prepack_weight(W)``; returns ``[..., N]``
    in ``x.dtype`` (``x`` is cast to the weight's dtype for the product when they differ)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != packed.dtype:
        x2 = x2.to(packed.dtype)
    b = None if bias is None else bias.to(packed.dtype)
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, b, "none", [], "")
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
