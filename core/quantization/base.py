"""What a checkpoint's quantization format tells the engine, per linear layer.

A :class:`QuantFormat` is read from ``config.json``'s ``quantization_config`` (or made from
``--quantization``). For every linear layer, named by its Hugging Face module path such as
``model.layers.0.self_attn.q_proj``, it answers :meth:`QuantFormat.layer_quant`: which
linear scheme of :mod:`heteroserve.core.kernels.linear` holds the layer and how the
format's checkpoint tensors become that scheme's tensors (:meth:`LayerQuant.convert`).
Converters are plain torch and run once at load time.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from heteroserve.core.models.config import ModelLoadError


class QuantizationError(ModelLoadError):
    """A quantized checkpoint the engine cannot use: unknown method, unsupported option,
    missing or malformed tensor. The message is one line naming the field or tensor."""


#: ``(tensor suffix, checkpoint tensor, full [N, K] of the layer or fused shard)`` ->
#: ``[(scheme parameter name, tensor)]`` (empty: the tensor is checked and dropped).
Converter = Callable[[str, torch.Tensor, tuple[int, int]], list[tuple[str, torch.Tensor]]]


def identity_converter(suffix: str, tensor: torch.Tensor,
                       full_shape: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    """Checkpoint tensors already carry the scheme's names and layouts."""
    return [(suffix, tensor)]


@dataclass(frozen=True)
class LayerQuant:
    """How one linear layer is stored.

    ``scheme``: a linear scheme name; ``group_size``/``has_g_idx``: for the W4A16 schemes;
    ``online``: the checkpoint holds the unquantized ``weight`` and the layer quantizes it
    to ``scheme`` after loading; ``label``: the format's own name for what it is (for logs);
    ``convert``: checkpoint tensors -> scheme tensors.
    """

    scheme: str = "unquantized"
    group_size: int = 128
    has_g_idx: bool = False
    online: bool = False
    label: str = "unquantized"
    convert: Converter = field(default=identity_converter, compare=False)

    def key(self) -> tuple[str, int, bool, bool, str]:
        """What must agree across the shards of a fused layer."""
        return self.scheme, self.group_size, self.has_g_idx, self.online, self.label


UNQUANTIZED = LayerQuant()


class QuantFormat(ABC):
    """One checkpoint quantization format (``quant_method``)."""

    #: ``quant_method`` as config.json spells it (``fp8``, ``awq``, ``gptq``, ...)
    method: str

    @abstractmethod
    def layer_quant(self, prefix: str) -> LayerQuant:
        """How the linear layer named ``prefix`` (unfused Hugging Face name) is stored."""

    @abstractmethod
    def schemes(self) -> tuple[str, ...]:
        """Every linear scheme :meth:`layer_quant` can answer (the engine resolves a kernel
        for each at start-up)."""

    @abstractmethod
    def describe(self) -> str:
        """One line for the start-up block, e.g. ``fp8 block 128x128, dynamic activations``."""

    def notes(self) -> tuple[str, ...]:
        """Things the engine does differently from the format's own description (shown at
        start-up), e.g. static activation scales replaced by dynamic quantization."""
        return ()


#: ``quant_method`` spelling: lower case letters, digits, ``-`` and ``_``
_METHOD_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class QuantFormatSpec:
    """A checkpoint quantization format a plugin adds (hook
    ``heteroserve_quantization_formats``).

    ``method``: the ``quantization_config.quant_method`` it reads, lower case (config.json's
    value is lower-cased before the lookup); it must not be a built-in method or another
    plugin's. ``reader``: ``quantization_config`` (the dict from config.json) ->
    :class:`QuantFormat`; raises :class:`QuantizationError` naming the field it refuses.
    The formats' :meth:`QuantFormat.schemes` may name built-in linear schemes or the plugin's
    own, for which the plugin registers ``linear.<scheme>`` kernels whose
    :meth:`~heteroserve.core.kernels.linear.LinearMethod.create_weights` declares the
    tensors. ``provider``: filled in by the loader (the plugin's distribution).
    """

    method: str
    reader: Callable[[dict[str, Any]], QuantFormat]
    description: str = ""
    provider: str = ""

    def __post_init__(self) -> None:
        if not _METHOD_NAME.fullmatch(self.method):
            raise ValueError(f"quantization format method {self.method!r} must be lower case "
                             "letters, digits, '-' or '_'")
        if not callable(self.reader):
            raise TypeError(f"quantization format {self.method!r}: reader is not callable")


def module_matches(prefix: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether module ``prefix`` matches one of ``patterns``: ``re:<regex>`` (matched against
    the whole name, as compressed-tensors does), an exact module name, or a name suffix
    (``lm_head``, ``mlp.gate``, the spelling of ``modules_to_not_convert``)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], prefix):
                return True
        elif prefix == pattern or prefix.endswith("." + pattern) or f".{pattern}." in f".{prefix}.":
            return True
    return False
