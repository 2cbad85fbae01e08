"""8-bit linear methods on AMD GPUs through ``aiter.gemm_a8w8``.

``aiter.gemm_a8w8(XQ [M, K], WQ [N, K], x_scale fp32 [M, 1], w_scale fp32 [N, 1], bias=None,
dtype=bf16|fp16)`` computes ``(XQ * x_scale) @ (WQ * w_scale)^T`` for int8 or fp8 operands.
Checkpoint formats (``create_weights``) are the torch-native methods'.

- ``int8_w8a8``: activations quantized per token by ``aiter.pertoken_quant(x,
  quant_dtype=torch.int8)`` -> ``(x_q [M, K], x_scale fp32 [M, 1])``.
- ``fp8_per_tensor``: the device's fp8 type is ``aiter.dtypes.fp8``. On e4m3fnuz GPUs (MI300)
  the e4m3fn checkpoint weight is reinterpreted: its bit pattern read as e4m3fnuz is half the
  value, so the scale doubles, and 0x80 (e4m3fn's -0, e4m3fnuz's NaN) becomes 0. Activations are
  quantized per tensor (one scale, broadcast to ``[M, 1]``) as the scheme's contract says.
"""

from __future__ import annotations

import aiter
import torch

from heteroserve.platforms.cpu.linear import Fp8PerTensorLinear, Int8W8A8Linear


def _register(layer: torch.nn.Module, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if hasattr(layer, name):
            delattr(layer, name)
        layer.register_buffer(name, t, persistent=False)


def _out(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


class AiterInt8W8A8Linear(Int8W8A8Linear):
    """int8 weights with per-channel scales, per-token dynamic int8 activations."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        _register(layer, weight_scale=layer.weight_scale.data.reshape(-1, 1).to(torch.float32))

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        x_q, x_scale = aiter.pertoken_quant(x.reshape(-1, x.shape[-1]), quant_dtype=torch.int8)
        out = aiter.gemm_a8w8(x_q, layer.weight, x_scale, layer.weight_scale, bias=None,
                              dtype=x.dtype)
        return _out(x, out, bias)


def fp8_e4m3fn_to_fnuz(weight: torch.Tensor, scale: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinterpret an e4m3fn tensor as e4m3fnuz with the same values: bits unchanged except
    0x80 -> 0x00, and the scale doubled (the fnuz exponent bias is one larger)."""
    bits = weight.view(torch.int8).clone()
    bits[bits == -128] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


class AiterFp8PerTensorLinear(Fp8PerTensorLinear):
    """fp8 weights with one scale, dynamic per-tensor fp8 activations (module docstring)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight, scale = layer.weight.data, layer.weight_scale.data.to(torch.float32)
        if aiter.dtypes.fp8 == torch.float8_e4m3fnuz and weight.dtype == torch.float8_e4m3fn:
            weight, scale = fp8_e4m3fn_to_fnuz(weight, scale)
        n = weight.shape[0]
        _register(layer, weight=weight, weight_scale=scale.reshape(1, 1).expand(n, 1).contiguous())

    def apply(self, layer: torch.nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        fp8 = layer.weight.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        fmax = torch.finfo(fp8).max
        scale = (x2.abs().amax() / fmax).clamp(min=1e-12)
        x_q = (x2 / scale).clamp(-fmax, fmax).to(fp8)
        x_scale = scale.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
        out = aiter.gemm_a8w8(x_q, layer.weight, x_scale, layer.weight_scale, bias=None,
                              dtype=x.dtype)
        return _out(x, out, bias)
