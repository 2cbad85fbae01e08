"""Hook specifications for heteroserve platform plugins.

A plugin is any module or object with functions marked ``@hookimpl`` and is found through the
``heteroserve.platforms`` entry-point group, the same way for the built-in platforms (cpu,
cuda, rocm, xpu, npu) and an out-of-tree vendor's package::

    [project.entry-points."heteroserve.platforms"]
    myvendor = "myvendor_heteroserve.plugin"

A plugin imports ``heteroserve.plugin_api`` only and declares the API version it was built
for (``HETEROSERVE_PLUGIN_API = "1.0"`` on the entry-point module); the loader refuses an
incompatible one by name (:mod:`heteroserve.core.plugins.api_version`).

Hooks are called once at start-up, never on the hot path. Each plugin's hooks are called
separately so that one plugin raising is reported with its error while the others load.
A hook implementation whose name or arguments match no spec below is rejected at load time
(``PluginManager.check_pending``), so a misspelled hook fails loudly instead of silently doing
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from heteroserve.core.kernels.linear import LinearSchemeSpec
    from heteroserve.core.kernels.registry import KernelRegistry
    from heteroserve.core.platform import Platform
    from heteroserve.core.quantization.base import QuantFormatSpec

PROJECT = "heteroserve"
ENTRY_POINT_GROUP = "heteroserve.platforms"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def heteroserve_platforms() -> list[Platform]:
    """Return the platforms this plugin provides (usually one; may be empty).

    Called once per process. Must not import the vendor package: build the
    :class:`~heteroserve.core.platform.Platform` objects only; their ``detect()`` does the
    importing later. A platform name already provided by another plugin is rejected and
    reported as that plugin's load failure.
    """


@hookspec
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    """Register kernel implementations with ``registry.register(KernelSpec(...))``.

    A plugin may register implementations for its own platform or for any other (the example
    plugin adds a second attention backend for ``cpu``). Specs load their implementation
    lazily through ``KernelSpec.load``; registering must not import vendor packages.
    Registering an ``(op, name)`` pair that another plugin took is reported as this plugin's
    failure and none of its kernels are kept.
    """


@hookspec
def heteroserve_conformance_options() -> dict[str, object]:
    """Extra options for the conformance suite run against this plugin's platform(s).

    Keys understood: ``"skip_ops"`` (list of op names with a reason each, as
    ``{"op": "reason"}``) for ops the vendor deliberately leaves to the fallback. Returning
    an empty dict means "test everything"; the report lists every skip with its reason.
    """


@hookspec
def heteroserve_quantization_formats() -> list[QuantFormatSpec]:
    """Return the checkpoint quantization formats this plugin adds (may be empty).

    Each :class:`~heteroserve.core.quantization.base.QuantFormatSpec` names the
    ``quantization_config.quant_method`` it reads and a reader that turns that config into a
    ``QuantFormat`` (which linear scheme holds each layer, and how the checkpoint's tensors
    become the scheme's). A scheme of the plugin's own needs ``linear.<scheme>`` kernels,
    registered in :func:`heteroserve_register_kernels` like any other op. Must not import
    vendor packages. A method that is built in or taken by another plugin is reported as
    this plugin's failure, and none of its platforms, kernels or formats are kept.
    """


@hookspec
def heteroserve_linear_schemes() -> list[LinearSchemeSpec]:
    """Return the definitions of the linear schemes this plugin adds (may be empty).

    A :class:`~heteroserve.core.kernels.linear.LinearSchemeSpec` gives the scheme's quantizer
    and dequantizer; the conformance suite runs every ``linear.<name>`` kernel, from any
    plugin, against ``x @ dequantize(quantize(W))^T``. A scheme without a definition cannot
    be certified. A built-in scheme name or one another plugin defined is reported as this
    plugin's failure.
    """
