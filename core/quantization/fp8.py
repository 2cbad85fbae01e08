"""``quant_method: fp8`` checkpoints, and ``--quantization fp8`` of an unquantized one.

Two layouts share the method name:

- block (Qwen3-FP8, DeepSeek-V3): ``weight_block_size: [128, 128]``; ``weight`` e4m3fn
  ``[N, K]`` and ``weight_scale_inv [ceil(N/128), ceil(K/128)]`` fp32 (despite the name, the
  multiplier: ``W = weight * scale``); activations quantized per token and 128 columns.
  -> scheme ``fp8_block``.
- per tensor (AutoFP8, ``activation_scheme: static|dynamic``): ``weight`` e4m3fn, scalar
  ``weight_scale`` and, when static, scalar ``input_scale``. -> scheme ``fp8_per_tensor``.
  The engine quantizes activations dynamically per tensor and does not read ``input_scale``.
  The q/k/v (gate/up) shards of a fused layer carry one scale each; the layer requantizes
  them to the largest (:func:`requantize_to_common_scale`), as the fused kernel takes one.

``ignored_layers`` / ``modules_to_not_convert`` stay unquantized.
"""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.core.kernels.linear import FP8_BLOCK
from heteroserve.core.quantization.base import (
    UNQUANTIZED, LayerQuant, QuantFormat, QuantizationError, module_matches,
)

_MIN_SCALE = 1e-12


def _per_tensor_converter(suffix: str, tensor: torch.Tensor, full_shape: tuple[int, int]
                          ) -> list[tuple[str, torch.Tensor]]:
    if suffix == "input_scale":
        return []
    if suffix == "weight_scale":
        if tensor.numel() != 1:
            raise ValueError(f"weight_scale has shape {list(tensor.shape)}, a per-tensor fp8 "
                             "checkpoint stores one scale")
        return [(suffix, tensor.to(torch.float32).reshape(1))]
    return [(suffix, tensor)]


def _block_converter(suffix: str, tensor: torch.Tensor, full_shape: tuple[int, int]
                     ) -> list[tuple[str, torch.Tensor]]:
    if suffix == "weight_scale_inv":
        return [(suffix, tensor.to(torch.float32))]
    if suffix in ("input_scale", "weight_scale"):
        raise ValueError(f"{suffix} is not part of a block-fp8 checkpoint (expected "
                         "weight_scale_inv)")
    return [(suffix, tensor)]


class Fp8Format(QuantFormat):
    """A serialized fp8 checkpoint (``quant_method: fp8``)."""

    method = "fp8"

    def __init__(self, cfg: dict[str, Any]) -> None:
        block = cfg.get("weight_block_size")
        fmt = cfg.get("fmt", "e4m3")
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise QuantizationError(f"quantization_config.fmt={fmt!r} is not supported "
                                    "(only e4m3 weights)")
        if block is not None and list(block) != [FP8_BLOCK, FP8_BLOCK]:
            raise QuantizationError(f"quantization_config.weight_block_size={block} is not "
                                    f"supported (only [{FP8_BLOCK}, {FP8_BLOCK}])")
        self.block = block is not None
        self.activation_scheme = cfg.get("activation_scheme", "dynamic")
        if self.activation_scheme not in ("dynamic", "static"):
            raise QuantizationError("quantization_config.activation_scheme must be dynamic or "
                                    f"static, got {self.activation_scheme!r}")
        if self.block and self.activation_scheme != "dynamic":
            raise QuantizationError("block fp8 with static activation scales is not supported")
        self.ignored = list(cfg.get("ignored_layers") or []) + list(
            cfg.get("modules_to_not_convert") or [])
        self._quant = (LayerQuant("fp8_block", label="fp8 block 128x128",
                                  convert=_block_converter) if self.block else
                       LayerQuant("fp8_per_tensor", label="fp8 per-tensor",
                                  convert=_per_tensor_converter))

    def layer_quant(self, prefix: str) -> LayerQuant:
        return UNQUANTIZED if module_matches(prefix, self.ignored) else self._quant

    def schemes(self) -> tuple[str, ...]:
        return (self._quant.scheme,)

    def describe(self) -> str:
        if self.block:
            return "fp8 (weights e4m3fn, one scale per 128x128 block; activations per token " \
                   "and 128-column group, dynamic)"
        return f"fp8 (weights e4m3fn per tensor; activations per tensor, " \
               f"{self.activation_scheme} in the checkpoint, dynamic here)"

    def notes(self) -> tuple[str, ...]:
        if not self.block and self.activation_scheme == "static":
            return ("static input_scale tensors are not read: activations are quantized "
                    "dynamically per tensor",)
        return ()


class OnlineFp8Format(QuantFormat):
    """``--quantization fp8`` of an unquantized checkpoint: every linear layer's weight is
    quantized to e4m3fn with one scale per tensor after loading (activations dynamic per
    tensor). The MoE router and the LM head stay unquantized."""

    method = "fp8"

    def layer_quant(self, prefix: str) -> LayerQuant:
        return LayerQuant("fp8_per_tensor", online=True, label="fp8 per-tensor (online)")

    def schemes(self) -> tuple[str, ...]:
        return ("fp8_per_tensor",)

    def describe(self) -> str:
        return "fp8 online (--quantization fp8: weights quantized at load, per tensor; " \
               "activations per tensor, dynamic)"


def quantize_per_tensor(weight: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` float -> ``(fp8 [N, K], scale fp32 [1])`` with ``scale = amax /
    fp8_max`` and ``weight ≈ fp8 * scale`` (saturating)."""
    fmax = float(torch.finfo(fp8_dtype).max)
    wf = weight.to(torch.float32)
    scale = (wf.abs().amax() / fmax).clamp(min=_MIN_SCALE).reshape(1)
    return (wf / scale).clamp(-fmax, fmax).to(fp8_dtype), scale


def requantize_to_common_scale(weight: torch.Tensor, shard_scales: list[torch.Tensor],
                               shard_rows: list[tuple[int, int]]) -> torch.Tensor:
    """Fused per-tensor fp8 shards -> one scale: rows ``[start, start + size)`` of ``weight
    [N, K]`` fp8 were quantized with ``shard_scales[i]``; they are re-rounded to the largest
    scale, in place, which is returned (fp32 ``[1]``)."""
    common = torch.stack([s.reshape(()).to(torch.float32) for s in shard_scales]).max()
    fmax = float(torch.finfo(weight.dtype).max)
    for scale, (start, size) in zip(shard_scales, shard_rows):
        rows = weight.narrow(0, start, size)
        ratio = scale.reshape(()).to(torch.float32) / common
        rows.copy_((rows.to(torch.float32) * ratio).clamp(-fmax, fmax).to(weight.dtype))
    return common.reshape(1)
