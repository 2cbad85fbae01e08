"""Quantized checkpoints: read ``quantization_config`` (or ``--quantization``) into a
:class:`~heteroserve.core.quantization.base.QuantFormat`, one module per format."""

from __future__ import annotations

from typing import Any

from heteroserve.core.quantization.awq_gptq import AwqFormat, GptqFormat
from heteroserve.core.quantization.base import (
    UNQUANTIZED, LayerQuant, QuantFormat, QuantizationError,
)
from heteroserve.core.quantization.compressed_tensors import CompressedTensorsFormat
from heteroserve.core.quantization.fp8 import Fp8Format, OnlineFp8Format

#: ``quant_method`` -> format reader
FORMATS: dict[str, type[QuantFormat]] = {
    "fp8": Fp8Format, "compressed-tensors": CompressedTensorsFormat, "awq": AwqFormat,
    "gptq": GptqFormat,
}
#: ``--quantization`` values (``None``: whatever the checkpoint says)
QUANTIZATION_CHOICES: tuple[str, ...] = tuple(FORMATS)

__all__ = ["FORMATS", "QUANTIZATION_CHOICES", "LayerQuant", "QuantFormat", "QuantizationError",
           "UNQUANTIZED", "detect_quantization"]


def detect_quantization(raw_config: dict[str, Any], requested: str | None) -> QuantFormat | None:
    """The checkpoint's format from ``config.json`` (``raw_config``), checked against
    ``--quantization`` (``requested``); ``--quantization fp8`` of an unquantized checkpoint
    quantizes it at load. None: unquantized. Raises :class:`QuantizationError` naming the
    field for an unknown method, a mismatch, or an unsupported option."""
    qcfg = raw_config.get("quantization_config") or raw_config.get("compression_config")
    if requested is not None and requested not in FORMATS:
        raise QuantizationError(f"--quantization {requested!r} is not supported; choose from "
                                f"{', '.join(QUANTIZATION_CHOICES)}")
    if not qcfg:
        if requested is None:
            return None
        if requested == "fp8":
            return OnlineFp8Format()
        raise QuantizationError(f"--quantization {requested} needs a checkpoint quantized with "
                                f"it (config.json has no quantization_config); only fp8 "
                                "quantizes an unquantized checkpoint at load")
    if not isinstance(qcfg, dict):
        raise QuantizationError("config.json quantization_config is not an object")
    method = str(qcfg.get("quant_method", "")).lower()
    if method not in FORMATS:
        raise QuantizationError(f"quantization_config.quant_method={method!r} is not supported; "
                                f"supported: {', '.join(FORMATS)}")
    if requested is not None and requested != method:
        raise QuantizationError(f"--quantization {requested} does not match the checkpoint's "
                                f"quantization_config.quant_method={method!r}")
    return FORMATS[method](qcfg)
