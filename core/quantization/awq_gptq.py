"""``quant_method: awq`` (AutoAWQ GEMM layout) and ``quant_method: gptq`` (GPTQ v1 layout).

AWQ: ``qweight [K, N/8]``, ``qzeros [K/G, N/8]`` int32 (nibble ``j`` of a word holds column
``8w + AWQ_ORDER[j]``), ``scales [K/G, N]`` fp16; ``version: gemm`` with ``zero_point: true``
only. -> ``awq_w4a16``.

GPTQ (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``): ``qweight [K/8, N]`` (row ``8w + j``
in nibble ``j``), ``qzeros [K/G, N/8]`` holding zero point minus 1, ``scales [K/G, N]``,
``g_idx [K]``. ``desc_act: true`` keeps ``g_idx`` (act-order groups); with ``desc_act:
false`` it must be ``k // G`` and is dropped. ``sym`` only changes the stored zero points.
``group_size: -1`` is one group over all of K. -> ``gptq_w4a16``.

Both: 4-bit only; ``modules_to_not_convert`` stays unquantized.
"""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.core.quantization.base import (
    UNQUANTIZED, LayerQuant, QuantFormat, QuantizationError, module_matches,
)


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)}, expected {list(shape)}")


def _group(group_size: int, k: int) -> int:
    return k if group_size == -1 else group_size


def _awq_converter(group_size: int):
    def convert(suffix: str, t: torch.Tensor, full: tuple[int, int]
                ) -> list[tuple[str, torch.Tensor]]:
        n, k = full
        groups = k // _group(group_size, k)
        expected = {"qweight": (k, n // 8), "qzeros": (groups, n // 8), "scales": (groups, n)}
        if suffix not in expected:
            raise ValueError(f"unexpected tensor {suffix} for an AWQ layer")
        _check(suffix, t, expected[suffix])
        return [(suffix, t.to(torch.float16) if suffix == "scales" else t)]
    return convert


def _gptq_converter(group_size: int, desc_act: bool):
    def convert(suffix: str, t: torch.Tensor, full: tuple[int, int]
                ) -> list[tuple[str, torch.Tensor]]:
        n, k = full
        group = _group(group_size, k)
        expected = {"qweight": (k // 8, n), "qzeros": (k // group, n // 8),
                    "scales": (k // group, n), "g_idx": (k,)}
        if suffix not in expected:
            raise ValueError(f"unexpected tensor {suffix} for a GPTQ layer")
        _check(suffix, t, expected[suffix])
        if suffix == "g_idx":
            if desc_act:
                return [(suffix, t.to(torch.int32))]
            plain = torch.arange(k, device=t.device) // group
            if not torch.equal(t.to(torch.int64), plain):
                raise ValueError("g_idx is not k // group_size but desc_act is false")
            return []
        return [(suffix, t.to(torch.float16) if suffix == "scales" else t)]
    return convert


def _four_bits(cfg: dict[str, Any], key: str = "bits") -> int:
    bits = cfg.get(key, cfg.get("w_bit"))
    if bits != 4:
        raise QuantizationError(f"quantization_config.{key}={bits}: only 4-bit weights are "
                                "supported")
    group = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
    if group != -1 and group <= 0:
        raise QuantizationError(f"quantization_config.group_size={group} is not valid")
    return group


class AwqFormat(QuantFormat):
    method = "awq"

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.group_size = _four_bits(cfg)
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"quantization_config.version={version!r}: only the AWQ "
                                    "GEMM layout is supported")
        if not cfg.get("zero_point", True):
            raise QuantizationError("quantization_config.zero_point=false: AWQ without zero "
                                    "points is not supported")
        self.ignored = list(cfg.get("modules_to_not_convert") or [])
        self._quant = LayerQuant("awq_w4a16", group_size=self.group_size,
                                 label=f"awq g{self.group_size}",
                                 convert=_awq_converter(self.group_size))

    def layer_quant(self, prefix: str) -> LayerQuant:
        return UNQUANTIZED if module_matches(prefix, self.ignored) else self._quant

    def schemes(self) -> tuple[str, ...]:
        return ("awq_w4a16",)

    def describe(self) -> str:
        return f"awq (GEMM layout, 4-bit, group {self.group_size}, zero points)"


class GptqFormat(QuantFormat):
    method = "gptq"

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.group_size = _four_bits(cfg)
        fmt = cfg.get("checkpoint_format", "gptq")
        if fmt != "gptq":
            raise QuantizationError(f"quantization_config.checkpoint_format={fmt!r}: only the "
                                    "GPTQ v1 layout ('gptq') is supported")
        if cfg.get("lm_head"):
            raise QuantizationError("quantization_config.lm_head=true (a quantized LM head) is "
                                    "not supported")
        if cfg.get("dynamic"):
            raise QuantizationError("quantization_config.dynamic (per-module GPTQ settings) "
                                    "is not supported")
        self.desc_act = bool(cfg.get("desc_act", False))
        self.sym = bool(cfg.get("sym", True))
        self.ignored = list(cfg.get("modules_to_not_convert") or [])
        self._quant = LayerQuant(
            "gptq_w4a16", group_size=self.group_size, has_g_idx=self.desc_act,
            label=f"gptq g{self.group_size}{' act-order' if self.desc_act else ''}",
            convert=_gptq_converter(self.group_size, self.desc_act))

    def layer_quant(self, prefix: str) -> LayerQuant:
        return UNQUANTIZED if module_matches(prefix, self.ignored) else self._quant

    def schemes(self) -> tuple[str, ...]:
        return ("gptq_w4a16",)

    def describe(self) -> str:
        return (f"gptq (v1 layout, 4-bit, group {self.group_size}, desc_act "
                f"{str(self.desc_act).lower()}, {'symmetric' if self.sym else 'asymmetric'})")
