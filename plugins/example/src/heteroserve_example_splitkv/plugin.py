"""Hook implementations: register the split-KV attention backend for the cpu platform, and
an int8 weight-only quantization scheme with its checkpoint format (``int8wo.py``).

The backend registers below the built-in torch-native attention (priority -150 < -100), so
installing this plugin changes nothing by default; select it with
``--kernel attention=splitkv_decode``. The conformance suite tests it either way, because it
tests every implementation a platform can run.

The quantization format ``example-int8-wo`` is read from a checkpoint's
``quantization_config``; its linear scheme ``example_int8_wo`` runs on any platform (plain
torch), so a checkpoint in that format loads wherever heteroserve runs once this plugin is
installed.
"""

from __future__ import annotations

from typing import Any

from heteroserve.plugin_api import (
    ANY_PLATFORM, ATTENTION, KernelRegistry, KernelRequest, KernelSpec, LinearSchemeSpec,
    QuantFormat, QuantFormatSpec, Support, hookimpl, linear_op,
)

#: the plugin API version this plugin was built for (the loader refuses incompatible ones)
HETEROSERVE_PLUGIN_API = "1.0"


def _load() -> Any:
    from heteroserve_example_splitkv.splitkv import SplitKVAttention

    return SplitKVAttention


def _load_int8wo() -> Any:
    from heteroserve_example_splitkv.int8wo import Int8WeightOnlyLinear

    return Int8WeightOnlyLinear


def _int8wo_supports(request: KernelRequest) -> Support:
    from heteroserve_example_splitkv.int8wo import supports

    return supports(request)


def _read_int8wo(cfg: dict[str, Any]) -> QuantFormat:
    from heteroserve_example_splitkv.int8wo import Int8WeightOnlyFormat

    return Int8WeightOnlyFormat(cfg)


def _supports(request: KernelRequest) -> Support:
    if request.head_size is not None and request.head_size > 256:
        return Support.no(f"head size {request.head_size} > 256")
    return Support.yes()


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    registry.register(KernelSpec(
        op=ATTENTION, name="splitkv_decode", load=_load, platforms=("cpu",), priority=-150,
        supports=_supports, description="torch split-KV decode (flash-decoding), example plugin"))
    registry.register(KernelSpec(
        op=linear_op("example_int8_wo"), name="example_int8_wo_torch", load=_load_int8wo,
        platforms=(ANY_PLATFORM,), supports=_int8wo_supports,
        description="torch int8 weight-only per-channel linear, example plugin"))


@hookimpl
def heteroserve_quantization_formats() -> list[QuantFormatSpec]:
    return [QuantFormatSpec(method="example-int8-wo", reader=_read_int8wo,
                            description="int8 weight-only, per output channel (example plugin)")]


@hookimpl
def heteroserve_linear_schemes() -> list[LinearSchemeSpec]:
    from heteroserve_example_splitkv.int8wo import SCHEME, dequantize, quantize

    return [LinearSchemeSpec(name=SCHEME, quantize=quantize, dequantize=dequantize,
                             description="int8 weights, one scale per output channel")]
