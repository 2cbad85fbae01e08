"""Quantized linear methods on Ascend.

The checkpoint formats (``create_weights``) are the torch-native methods' (one source of truth
for every platform); these subclasses repack in ``process_weights_after_loading`` and compute
with torch_npu:

- ``int8_w8a8``: ``torch_npu.npu_dynamic_quant(x [M, K] fp16/bf16)`` -> ``(x_q int8 [M, K],
  pertoken_scale fp32 [M])`` (symmetric, rowmax/127); then ``torch_npu.npu_quant_matmul(x1=x_q,
  x2=int8 [K, N] (the checkpoint weight transposed), scale=fp32 [N], pertoken_scale=...,
  bias=None, output_dtype=x.dtype)``.
- ``awq_w4a16`` / ``gptq_w4a16``: the 4-bit codes are unpacked to int32 ``[K, N]``, shifted to
  signed int4 (``q - 8``) and packed by ``torch_npu.npu_convert_weight_to_int4pack`` (its own
  layout; we never read it). ``torch_npu.npu_weight_quant_batchmatmul(x [M, K],
  weight=<packed int4 [K, N/8]>, antiquant_scale=[K/G, N], antiquant_offset=[K/G, N],
  bias=..., antiquant_group_size=G)`` computes ``x @ ((w + offset) * scale)``, so
  ``offset = 8 - zero`` reproduces ``(q - zero) * scale``. One group (``K == G``) uses the
  per-channel form (``[N]`` scales, group size 0) because the operator wants ``G < K``.
  GPTQ act-order (a ``g_idx`` that is not ``k // G``) is served by sorting the input rows by
  group once and gathering ``x``'s columns in the same order at apply time.
"""

from __future__ import annotations

import torch

from heteroserve.platforms.cpu.linear import AwqW4A16Linear, GptqW4A16Linear, Int8W8A8Linear
from heteroserve.platforms.npu.platform import _torch_npu

_npu = _torch_npu()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _set(layer: torch.nn.Module, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        layer.register_buffer(name, t, persistent=False)


def _drop(layer: torch.nn.Module, *names: str) -> None:
    for name in names:
        if hasattr(layer, name):
            delattr(layer, name)


class NpuInt8W8A8Linear(Int8W8A8Linear):
    """W8A8 int8 with per-token dynamic activation quantization (see module docstring)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _set(layer, npu_weight_t=layer.weight.data.t().contiguous(),
             npu_weight_scale=layer.weight_scale.data.reshape(-1).to(torch.float32))
        _drop(layer, "weight", "weight_scale")

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = _flat(x)
        x_q, x_scale = _npu.npu_dynamic_quant(x2)
        out = _npu.npu_quant_matmul(x_q, layer.npu_weight_t, layer.npu_weight_scale,
                                    pertoken_scale=x_scale, bias=None, output_dtype=x.dtype)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])


class _NpuW4A16Mixin:
    """Repack the torch-native unpacked layout (``w4_q [K, N]`` codes, ``w4_zeros [G, N]``
    true zero points, ``scales [G, N]``, ``w4_g_idx [K]``) for torch_npu, then apply."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)  # type: ignore[misc]  (torch-native unpack)
        q, zeros, scale = layer.w4_q.data, layer.w4_zeros.data, layer.scales.data
        g_idx = layer.w4_g_idx.data.to(torch.long)
        k_dim, groups = q.shape[0], scale.shape[0]
        natural = torch.arange(k_dim, device=q.device) // (k_dim // groups)
        perm = None
        if not torch.equal(g_idx, natural):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], natural):
                raise ValueError(f"{self.scheme}: g_idx must put exactly K/G rows in each group")
            q = q.index_select(0, perm)
        offset = (8 - zeros.to(torch.float32)).to(scale.dtype)
        group_size = k_dim // groups
        if groups == 1:
            scale, offset, group_size = scale.reshape(-1), offset.reshape(-1), 0
        packed = _npu.npu_convert_weight_to_int4pack((q.to(torch.int32) - 8).contiguous())
        _drop(layer, "w4_q", "w4_zeros", "w4_g_idx", "scales")
        _set(layer, npu_qweight=packed, npu_scale=scale, npu_offset=offset)
        layer.npu_group_size = group_size
        layer.npu_perm = perm

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = _flat(x)
        if layer.npu_perm is not None:
            x2 = x2.index_select(1, layer.npu_perm)
        if layer.npu_scale.dtype != x.dtype:  # the operator wants scales in x's dtype; once
            _set(layer, npu_scale=layer.npu_scale.to(x.dtype),
                 npu_offset=layer.npu_offset.to(x.dtype))
        if bias is not None:
            bias = bias.to(torch.float32 if x.dtype == torch.bfloat16 else x.dtype)
        out = _npu.npu_weight_quant_batchmatmul(
            x2, layer.npu_qweight, layer.npu_scale, antiquant_offset=layer.npu_offset, bias=bias,
            antiquant_group_size=layer.npu_group_size)
        return out.view(*x.shape[:-1], out.shape[-1])


class NpuAwqW4A16Linear(_NpuW4A16Mixin, AwqW4A16Linear):
    """AWQ 4-bit weights through ``npu_weight_quant_batchmatmul`` (see module docstring)."""


class NpuGptqW4A16Linear(_NpuW4A16Mixin, GptqW4A16Linear):
    """GPTQ (v1 zero points, optional act-order) 4-bit weights through
    ``npu_weight_quant_batchmatmul``."""
