"""``quant_method: compressed-tensors`` checkpoints (LLM Compressor, vLLM).

``config_groups`` map ``targets`` (``Linear``, ``re:<regex>`` or module names) to weight
and input-activation arguments; ``ignore`` lists modules left unquantized (same spellings).
Supported groups and the linear scheme each becomes:

- ``pack-quantized``, int 4-bit weights, group (or channel) strategy, no activation
  quantization (W4A16): ``weight_packed [N, K/8]`` int32 (eight values of a row per word,
  element ``8w + j`` in nibble ``j``, stored as ``q + 8``), ``weight_scale [N, K/G]``,
  ``weight_shape [2]``, and for asymmetric weights ``weight_zero_point [N/8, K/G]`` packed
  along N. Symmetric -> ``gptq_w4a16`` (``qweight`` is ``weight_packed`` transposed, zero
  point 8); asymmetric -> ``awq_w4a16`` (repacked in AWQ's order).
- ``int-quantized``, int8 channel (or tensor) symmetric weights, int8 activations (W8A8):
  ``weight [N, K]`` int8, ``weight_scale`` -> ``int8_w8a8`` (activations per token, dynamic).
- ``float-quantized`` / ``naive-quantized`` fp8 weights: tensor strategy ->
  ``fp8_per_tensor``, channel -> ``fp8_per_channel``, block 128x128 -> ``fp8_block``
  (``weight_scale`` renamed ``weight_scale_inv``).

Static activation scales (``input_scale``) are not read: the engine quantizes activations
dynamically, at the granularity of the scheme (said at start-up). Anything else (other bit
widths, activation ordering, asymmetric int8, sparsity, transforms) fails at load by name.
"""

from __future__ import annotations

from typing import Any

import torch

from heteroserve.core.kernels.linear import AWQ_ORDER, FP8_BLOCK
from heteroserve.core.quantization import nibbles
from heteroserve.core.quantization.base import (
    UNQUANTIZED, LayerQuant, QuantFormat, QuantizationError, module_matches,
)

_ZERO8_WORD = int(nibbles.pack(torch.full((8,), 7), 0))  # GPTQ v1 stores zero point - 1


def _check(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)}, expected {list(shape)}")


def _groups(full_shape: tuple[int, int], group: int) -> int:
    k = full_shape[1]
    return 1 if group == -1 else -(-k // group)


def _w4_converter(group: int, symmetric: bool):
    """weight_packed / weight_scale / weight_zero_point / weight_shape -> gptq (symmetric)
    or awq (asymmetric) tensors."""

    def convert(suffix: str, t: torch.Tensor, full: tuple[int, int]
                ) -> list[tuple[str, torch.Tensor]]:
        n, k = full
        g = _groups(full, group)
        if suffix == "weight_shape":
            if [int(v) for v in t.reshape(-1)] != [n, k]:
                raise ValueError(f"weight_shape {t.tolist()} does not match the layer's [{n}, {k}]")
            return []
        if suffix == "weight_packed":
            _check(suffix, t, (n, k // 8))
            if symmetric:
                return [("qweight", t.t().contiguous())]
            values = nibbles.unpack(t, 1).t()  # [K, N]
            return [("qweight", nibbles.pack(values, 1, AWQ_ORDER))]
        if suffix == "weight_scale":
            _check(suffix, t, (n, g))
            out = [("scales", t.t().to(torch.float16).contiguous())]
            if symmetric:
                out.append(("qzeros", torch.full((g, n // 8), _ZERO8_WORD, dtype=torch.int32,
                                                  device=t.device)))
            return out
        if suffix == "weight_zero_point" and not symmetric:
            _check(suffix, t, (n // 8, g))
            zeros = nibbles.unpack(t, 0).t()  # [K/G, N], unsigned zero points
            return [("qzeros", nibbles.pack(zeros, 1, AWQ_ORDER))]
        raise ValueError(f"unexpected tensor {suffix} for a pack-quantized "
                         f"{'symmetric' if symmetric else 'asymmetric'} layer")
    return convert


def _scaled_converter(scale_name: str, per_row_from_tensor: bool):
    """weight / weight_scale (-> ``scale_name``) / input_scale (dropped)."""

    def convert(suffix: str, t: torch.Tensor, full: tuple[int, int]
                ) -> list[tuple[str, torch.Tensor]]:
        if suffix == "input_scale":
            return []
        if suffix == "weight":
            _check(suffix, t, full)
            return [("weight", t)]
        if suffix == "weight_scale":
            scale = t.to(torch.float32)
            if per_row_from_tensor and scale.numel() == 1:
                scale = scale.reshape(1, 1).expand(full[0], 1).contiguous()
            if scale_name == "weight_scale" and scale.dim() == 0:
                scale = scale.reshape(1)
            return [(scale_name, scale)]
        if suffix == "weight_zero_point":
            if t.to(torch.float32).abs().max() > 0:
                raise ValueError("weight_zero_point is non-zero: asymmetric 8-bit weights are "
                                 "not supported")
            return []
        raise ValueError(f"unexpected tensor {suffix} for a {scale_name} layer")
    return convert


class _Group:
    """One ``config_groups`` entry, resolved to a :class:`LayerQuant`."""

    def __init__(self, name: str, group: dict[str, Any], default_format: str | None) -> None:
        self.name = name
        self.targets: list[str] = list(group.get("targets") or [])
        weights = group.get("weights")
        acts = group.get("input_activations")
        fmt = group.get("format") or default_format
        where = f"quantization_config.config_groups.{name}"
        if weights is None:
            raise QuantizationError(f"{where} quantizes no weights (activation-only "
                                    "quantization is not supported)")
        if group.get("output_activations"):
            raise QuantizationError(f"{where}.output_activations is not supported")
        self.static_acts = bool(acts) and not acts.get("dynamic", False)
        self.quant = self._resolve(where, fmt, weights, acts)

    @staticmethod
    def _resolve(where: str, fmt: str | None, w: dict[str, Any], a: dict[str, Any] | None
                 ) -> LayerQuant:
        bits, kind = w.get("num_bits"), w.get("type", "int")
        strategy, sym = w.get("strategy"), w.get("symmetric", True)
        if w.get("actorder"):
            raise QuantizationError(f"{where}.weights.actorder={w['actorder']!r} is not "
                                    "supported")
        if w.get("dynamic"):
            raise QuantizationError(f"{where}.weights.dynamic=true is not supported")
        if kind == "int" and bits == 4 and a is None and fmt == "pack-quantized":
            if strategy not in ("group", "channel"):
                raise QuantizationError(f"{where}: 4-bit weights with strategy {strategy!r} "
                                        "are not supported (group or channel)")
            group = int(w.get("group_size") or -1) if strategy == "group" else -1
            label = f"compressed-tensors W4A16 {'sym' if sym else 'asym'} g{group}"
            return LayerQuant("gptq_w4a16" if sym else "awq_w4a16", group_size=group,
                              label=label, convert=_w4_converter(group, bool(sym)))
        if kind == "int" and bits == 8 and fmt == "int-quantized":
            if not sym or strategy not in ("channel", "tensor"):
                raise QuantizationError(f"{where}: int8 weights must be symmetric, channel or "
                                        f"tensor (got symmetric={sym}, strategy={strategy!r})")
            if a is None or a.get("num_bits") != 8 or a.get("type", "int") != "int" \
                    or not a.get("symmetric", True):
                raise QuantizationError(f"{where}: int8 weights need symmetric int8 input "
                                        "activations (W8A8); weight-only int8 is not supported")
            return LayerQuant("int8_w8a8", label=f"compressed-tensors W8A8 int8 {strategy}",
                              convert=_scaled_converter("weight_scale", True))
        if kind == "float" and bits == 8 and fmt in ("float-quantized", "naive-quantized"):
            if a is not None and (a.get("num_bits") != 8 or a.get("type") != "float"):
                raise QuantizationError(f"{where}: fp8 weights need fp8 input activations or "
                                        "none")
            if strategy == "tensor":
                return LayerQuant("fp8_per_tensor", label="compressed-tensors FP8 tensor",
                                  convert=_scaled_converter("weight_scale", False))
            if strategy == "channel":
                return LayerQuant("fp8_per_channel", label="compressed-tensors FP8 channel",
                                  convert=_scaled_converter("weight_scale", True))
            if strategy == "block" and list(w.get("block_structure") or []) == [FP8_BLOCK] * 2:
                return LayerQuant("fp8_block", label="compressed-tensors FP8 block 128x128",
                                  convert=_scaled_converter("weight_scale_inv", False))
            raise QuantizationError(f"{where}: fp8 weights with strategy {strategy!r} "
                                    f"(block_structure {w.get('block_structure')}) are not "
                                    "supported")
        raise QuantizationError(f"{where}: {bits}-bit {kind} weights in format {fmt!r} with "
                                f"activations {a and a.get('num_bits')} are not supported")

    def match_rank(self, prefix: str) -> int | None:
        """0: named exactly, 1: by regex, 2: by class (``Linear``); None: no match."""
        ranks = []
        for target in self.targets:
            if target == prefix:
                ranks.append(0)
            elif target.startswith("re:") and module_matches(prefix, [target]):
                ranks.append(1)
            elif target == "Linear":
                ranks.append(2)
        return min(ranks) if ranks else None


class CompressedTensorsFormat(QuantFormat):
    method = "compressed-tensors"

    def __init__(self, cfg: dict[str, Any]) -> None:
        status = cfg.get("quantization_status", "compressed")
        if status != "compressed":
            raise QuantizationError(f"quantization_config.quantization_status={status!r}: only "
                                    "compressed checkpoints are supported")
        if cfg.get("sparsity_config"):
            raise QuantizationError("quantization_config.sparsity_config is not supported")
        if cfg.get("transform_config"):
            raise QuantizationError("quantization_config.transform_config is not supported")
        if cfg.get("kv_cache_scheme"):
            raise QuantizationError("quantization_config.kv_cache_scheme is not supported "
                                    "(use --kv-cache-dtype)")
        groups = cfg.get("config_groups") or {}
        if not groups:
            raise QuantizationError("quantization_config.config_groups is empty")
        self.groups = [_Group(name, g, cfg.get("format")) for name, g in groups.items()]
        self.ignore: list[str] = list(cfg.get("ignore") or [])

    def layer_quant(self, prefix: str) -> LayerQuant:
        if module_matches(prefix, self.ignore):
            return UNQUANTIZED
        ranked = [(rank, g) for g in self.groups if (rank := g.match_rank(prefix)) is not None]
        if not ranked:
            return UNQUANTIZED
        return min(ranked, key=lambda rg: rg[0])[1].quant

    def schemes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.quant.scheme for g in self.groups))

    def describe(self) -> str:
        return "compressed-tensors (" + "; ".join(
            f"{g.name}: {g.quant.label} -> {', '.join(g.targets)}" for g in self.groups) + \
            (f"; ignore {len(self.ignore)} module(s))" if self.ignore else ")")

    def notes(self) -> tuple[str, ...]:
        if any(g.static_acts for g in self.groups):
            return ("static input_scale tensors are not read: activations are quantized "
                    "dynamically",)
        return ()
