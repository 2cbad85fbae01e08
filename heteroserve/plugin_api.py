"""heteroserve.plugin_api: the one module a platform plugin imports.

Everything a plugin needs is here, and only what is here is promised to stay (see
``docs/plugin-api.md``): the hook marker, the Platform contract and its capability types, the
kernel registry's types, every op name and contract, the attention and linear-method bases,
the quantization-format types (a checkpoint reader and its linear scheme),
the communicator and graph-runner bases, the torch-native reference kernels (to build on or
to fall back to) and the conformance runner. A plugin declares the version it was built for::

    HETEROSERVE_PLUGIN_API = "1.0"     # module level, on the entry-point module

and the loader refuses it, by name, when this heteroserve offers an incompatible
:data:`PLUGIN_API_VERSION` (another major, or an older minor).

Names under ``heteroserve.core``, ``heteroserve.platforms`` and ``heteroserve.conformance`` are
internal: they may move in any release.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import CapturedGraph, EagerGraphRunner, GraphRunner
from heteroserve.core.kernels import ops
from heteroserve.core.kernels.attention import (
    AttentionBackend, AttentionConfig, AttentionLayer, AttentionMetadata, AttentionPrologue,
    ForwardMode,
)
from heteroserve.core.kernels.linear import (
    LINEAR_SCHEMES, LinearMethod, LinearSchemeSpec, LinearShape, ParamSpec,
)
from heteroserve.core.kernels.ops import (
    ATTENTION, FUNCTION_OPS, FUSED_ADD_RMS_NORM, FUSED_MOE, GELU_AND_MUL, MOE_GROUPED_TOPK,
    MOE_DESCRIBE_ATTR, MOE_PROCESS_WEIGHTS_ATTR, MOE_SHARED_SLOTS_ATTR, MOE_TOPK_SOFTMAX,
    MOE_WEIGHT_SCHEMES,
    MOE_WEIGHT_SCHEMES_ATTR, NORM_ADD_NORM, QK_NORM_ROTARY, RMS_NORM, ROTARY, SAMPLING,
    SILU_AND_MUL, TOKEN_BITMASK_APPLY,
    FusedAddRMSNormOp, FusedMoEOp, GeluAndMulOp, MoEWeightQuant, GroupedTopKOp, NormAddNormOp,
    QKNormRotaryOp, RMSNormOp,
    RotaryOp,
    SamplingBatch, SamplingOp, SiluAndMulOp, TokenBitmaskApplyOp, TopKSoftmaxOp,
    append_shared_slots, check_w4_experts, dequantize_w4_experts, linear_op, moe_expert_dims,
)
from heteroserve.core.kernels.registry import (
    ANY_PLATFORM, KernelRegistry, KernelRequest, KernelSpec, Support,
)
from heteroserve.core.platform import (
    Availability, Fp8Flavour, KVLayout, Platform, PlatformCapabilities,
)
from heteroserve.core.plugins.api_version import (
    DECLARATION_ATTR, PLUGIN_API_VERSION, ApiVersion, PluginApiVersionError, is_compatible,
)
from heteroserve.core.plugins.hookspecs import ENTRY_POINT_GROUP, hookimpl
from heteroserve.core.quantization.base import (
    UNQUANTIZED, LayerQuant, QuantFormat, QuantFormatSpec, QuantizationError, module_matches,
)

if TYPE_CHECKING:
    from heteroserve.platforms.cpu.attention import TorchNativeAttention
    from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator

__all__ = [
    # versioning
    "PLUGIN_API_VERSION", "DECLARATION_ATTR", "ApiVersion", "PluginApiVersionError",
    "is_compatible",
    # discovery
    "hookimpl", "ENTRY_POINT_GROUP",
    # platform
    "Platform", "Availability", "PlatformCapabilities", "KVLayout", "Fp8Flavour",
    # registry
    "KernelRegistry", "KernelSpec", "KernelRequest", "Support", "ANY_PLATFORM",
    # ops and their contracts
    "ops", "ATTENTION", "RMS_NORM", "FUSED_ADD_RMS_NORM", "NORM_ADD_NORM", "SILU_AND_MUL",
    "GELU_AND_MUL",
    "ROTARY", "QK_NORM_ROTARY", "MOE_TOPK_SOFTMAX", "MOE_GROUPED_TOPK", "FUSED_MOE", "SAMPLING",
    "TOKEN_BITMASK_APPLY", "FUNCTION_OPS", "linear_op", "MOE_PROCESS_WEIGHTS_ATTR",
    "MOE_DESCRIBE_ATTR", "MOE_SHARED_SLOTS_ATTR", "append_shared_slots",
    "MOE_WEIGHT_SCHEMES_ATTR", "MOE_WEIGHT_SCHEMES", "MoEWeightQuant", "moe_expert_dims",
    "check_w4_experts", "dequantize_w4_experts",
    "RMSNormOp", "FusedAddRMSNormOp", "NormAddNormOp", "QKNormRotaryOp",
    "SiluAndMulOp", "GeluAndMulOp", "RotaryOp", "TopKSoftmaxOp", "GroupedTopKOp", "FusedMoEOp",
    "SamplingOp", "SamplingBatch", "TokenBitmaskApplyOp",
    # attention and linear bases
    "AttentionBackend", "AttentionConfig", "AttentionLayer", "AttentionMetadata",
    "AttentionPrologue", "ForwardMode",
    "LinearMethod", "LinearShape", "ParamSpec", "LINEAR_SCHEMES",
    # quantization formats (checkpoint readers a plugin adds)
    "QuantFormat", "QuantFormatSpec", "LinearSchemeSpec", "LayerQuant", "UNQUANTIZED", "QuantizationError",
    "module_matches",
    # communicator and graphs
    "Communicator", "TorchDistributedCommunicator", "GraphRunner", "CapturedGraph",
    "EagerGraphRunner",
    # reference kernels and test helpers
    "TorchNativeAttention", "torch_native", "run_conformance",
]

#: names exported lazily (they import torch-native kernel modules on first use)
_LAZY: dict[str, tuple[str, str]] = {
    "TorchNativeAttention": ("heteroserve.platforms.cpu.attention", "TorchNativeAttention"),
    "TorchDistributedCommunicator": ("heteroserve.platforms.cpu.communicator",
                                     "TorchDistributedCommunicator"),
}

#: deprecated name -> (replacement, the minor version that removes it). A deprecated name
#: warns for one minor version and is then removed (docs/plugin-api.md).
_DEPRECATED: dict[str, tuple[str, str]] = {}


def torch_native(op: str) -> Any:
    """The built-in torch-native implementation of ``op`` (a function, or a class for
    attention and ``linear.<scheme>``). It runs on any torch device; use it to fall back
    explicitly, to build on (subclass the attention class), or to simulate a device on the
    CPU. Raises ``KeyError`` naming the known ops."""
    from heteroserve.platforms.cpu.plugin import TORCH_NATIVE

    if op not in TORCH_NATIVE:
        raise KeyError(f"no torch-native implementation of op {op!r} "
                       f"(ops: {', '.join(sorted(TORCH_NATIVE))})")
    module, attr = TORCH_NATIVE[op]
    return getattr(importlib.import_module(f"heteroserve.platforms.cpu.{module}"), attr)


def run_conformance(platform: str, report_dir: str | None = None,
                    pytest_args: list[str] | tuple[str, ...] = ()) -> int:
    """Run the conformance suite for ``platform`` in this process (needs pytest); returns
    pytest's exit code (0 all passed, 1 a test failed, 4 usage error)."""
    from heteroserve.conformance.runner import run_conformance as run

    return run(platform, report_dir, list(pytest_args))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _DEPRECATED:
        replacement, removed_in = _DEPRECATED[name]
        warnings.warn(f"heteroserve.plugin_api.{name} is deprecated and will be removed in "
                      f"plugin API {removed_in}; use {replacement}", DeprecationWarning,
                      stacklevel=2)
        return _resolve(replacement)
    raise AttributeError(f"module 'heteroserve.plugin_api' has no attribute {name!r}")


def _resolve(name: str) -> Any:
    value: Any = globals().get(name)
    return value if value is not None else __getattr__(name)


def __dir__() -> list[str]:
    return sorted(__all__)

