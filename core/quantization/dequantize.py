"""Dequantize one linear scheme's tensors (``core/kernels/linear.py`` layouts) to a dense
``W [N, K]``: for weights the engine keeps in the model dtype (quantized MoE experts)."""

from __future__ import annotations

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER, FP8_BLOCK
from heteroserve.core.quantization import nibbles


def dequantize(scheme: str, p: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """fp32 ``W [N, K]`` from scheme ``scheme``'s tensors ``p`` (``group_size`` for the W4A16
    schemes, ``-1``: one group). Raises ``ValueError`` for an unknown scheme."""
    if scheme == "unquantized":
        return p["weight"].to(torch.float32)
    if scheme in ("fp8_per_tensor", "fp8_per_channel", "int8_w8a8"):
        w, s = p["weight"].to(torch.float32), p["weight_scale"].to(torch.float32)
        return w * (s.reshape(1, 1) if s.numel() == 1 else s.reshape(-1, 1))
    if scheme == "fp8_block":
        w = p["weight"].to(torch.float32)
        n, k = w.shape
        s = p["weight_scale_inv"].to(torch.float32)
        s = s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:n, :k]
        return w * s
    if scheme in ("awq_w4a16", "gptq_w4a16"):
        if scheme == "awq_w4a16":
            q = nibbles.unpack(p["qweight"], 1, AWQ_ORDER)  # [K, N]
            z = nibbles.unpack(p["qzeros"], 1, AWQ_ORDER)
        else:
            q = nibbles.unpack(p["qweight"], 0)
            z = nibbles.unpack(p["qzeros"], 1).to(torch.int16) + 1
        k = q.shape[0]
        group = k if group_size == -1 else group_size
        g_idx = p["g_idx"].to(torch.long) if "g_idx" in p else \
            torch.arange(k, device=q.device) // group
        s = p["scales"].to(torch.float32)
        return ((q.to(torch.float32) - z.to(torch.float32)[g_idx]) * s[g_idx]).t()
    raise ValueError(f"unknown linear scheme {scheme!r}")
