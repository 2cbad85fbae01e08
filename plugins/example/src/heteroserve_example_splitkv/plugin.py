"""Hook implementations: register the split-KV attention backend for the cpu platform.

The backend registers below the built-in torch-native attention (priority -150 < -100), so
installing this plugin changes nothing by default; select it with
``--kernel attention=splitkv_decode``. The conformance suite tests it either way, because it
tests every implementation a platform can run.
"""

from __future__ import annotations

from typing import Any

from heteroserve import hookimpl
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec, Support


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
        op=ops.ATTENTION, name="splitkv_decode", load=_load, platforms=("cpu",), priority=-150,
        supports=_supports, description="torch split-KV decode (flash-decoding), example plugin"))
