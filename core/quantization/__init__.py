"""Quantized checkpoints: read ``quantization_config`` (or ``--quantization``) into a
:class:`~heteroserve.core.quantization.base.QuantFormat`, one module per built-in format.

Plugins add formats through the ``heteroserve_quantization_formats`` hook
(:class:`~heteroserve.core.quantization.base.QuantFormatSpec`); the loader collects them
into ``PluginCatalog.quant_formats``, which :func:`detect_quantization` consults after the
built-in :data:`FORMATS`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from heteroserve.core.quantization.awq_gptq import AwqFormat, GptqFormat
from heteroserve.core.quantization.base import (
    UNQUANTIZED, LayerQuant, QuantFormat, QuantFormatSpec, QuantizationError,
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

__all__ = ["FORMATS", "QUANTIZATION_CHOICES", "LayerQuant", "QuantFormat", "QuantFormatSpec",
           "QuantizationError", "UNQUANTIZED", "detect_quantization"]


def detect_quantization(raw_config: dict[str, Any], requested: str | None,
                        plugin_formats: Mapping[str, QuantFormatSpec] | None = None
                        ) -> QuantFormat | None:
    """The checkpoint's format from ``config.json`` (``raw_config``), checked against
    ``--quantization`` (``requested``); ``--quantization fp8`` of an unquantized checkpoint
    quantizes it at load. None: unquantized. ``plugin_formats`` (``quant_method`` -> spec)
    are the formats plugins added; a built-in method always wins. Raises
    :class:`QuantizationError` naming the field for an unknown method, a mismatch, or an
    unsupported option (a plugin reader raising anything else is reported the same way,
    naming the plugin)."""
    plugin_formats = {m: s for m, s in (plugin_formats or {}).items() if m not in FORMATS}
    known = (*QUANTIZATION_CHOICES, *plugin_formats)
    qcfg = raw_config.get("quantization_config") or raw_config.get("compression_config")
    if requested is not None and requested not in known:
        raise QuantizationError(f"--quantization {requested!r} is not supported; choose from "
                                f"{', '.join(known)}")
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
    if method not in known:
        raise QuantizationError(f"quantization_config.quant_method={method!r} is not supported; "
                                f"supported: {', '.join(known)}")
    if requested is not None and requested != method:
        raise QuantizationError(f"--quantization {requested} does not match the checkpoint's "
                                f"quantization_config.quant_method={method!r}")
    if method in FORMATS:
        return FORMATS[method](qcfg)
    return _read_plugin_format(plugin_formats[method], qcfg)


def _read_plugin_format(spec: QuantFormatSpec, qcfg: dict[str, Any]) -> QuantFormat:
    """Run a plugin's reader; anything but a :class:`QuantFormat` or a
    :class:`QuantizationError` becomes a one-line :class:`QuantizationError`."""
    who = f"quant_method {spec.method!r} (plugin {spec.provider or '?'})"
    try:
        fmt = spec.reader(dict(qcfg))
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"{who}: reading quantization_config failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(fmt, QuantFormat):
        raise QuantizationError(f"{who}: reader returned {type(fmt).__name__}, not a "
                                "QuantFormat")
    if not fmt.schemes():
        raise QuantizationError(f"{who}: the format names no linear scheme")
    return fmt
