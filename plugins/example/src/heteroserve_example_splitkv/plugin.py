"""Hook implementations: register the split-KV attention backend for the cpu platform.

The backend registers below the built-in torch-native attention (priority -150 < -100), so
installing this plugin changes nothing by default; select it with
``--kernel attention=splitkv_decode``. The conformance suite tests it either way, because it
tests every implementation a platform can run.
"""

from __future__ import annotations

from typing import Any

from heteroserve.plugin_api import (
    ATTENTION, KernelRegistry, KernelRequest, KernelSpec, Support, hookimpl,
)

#: the plugin API version this plugin was built for (the loader refuses incompatible ones)
HETEROSERVE_PLUGIN_API = "1.0"


def _load() -> Any:
    from heteroserve_example_splitkv.splitkv import SplitKVAttention

    return SplitKVAttention


def _supports(request: KernelRequest) -> Support:
    if request.head_size is not None and request.head_size > 256:
        return Support.no(f"head size {request.head_size} > 256")
    return Support.yes()


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    registry.register(KernelSpec(
        op=ATTENTION, name="splitkv_decode", load=_load, platforms=("cpu",), priority=-150,
        supports=_supports, description="torch split-KV decode (flash-decoding), example plugin"))
