"""What a conformance run is about: one platform, its capabilities and its implementations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from heteroserve.core.kernels.registry import KernelRequest, KernelSpec
from heteroserve.core.platform import Availability, Platform, PlatformCapabilities
from heteroserve.core.plugins.manager import PlatformSelectionError, PluginCatalog, load_plugins

#: every model dtype the suite knows; those a platform does not declare are skipped, with reason
ALL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ConformanceSetupError(RuntimeError):
    """The platform cannot be tested at all (unknown, unavailable, bad plugin options)."""


def _parse_skip_ops(options: dict[str, Any]) -> dict[str, str]:
    raw = options.get("skip_ops") or {}
    if isinstance(raw, dict):
        return {str(op): str(reason) for op, reason in raw.items()}
    if isinstance(raw, (list, tuple)):
        return {str(op): "skipped by the platform plugin (no reason given)" for op in raw}
    raise ConformanceSetupError(
        f"heteroserve_conformance_options()['skip_ops'] must map op -> reason, got {raw!r}")


@dataclass
class ConformanceContext:
    """The platform under test and everything the suite derives from it.

    ``skip_ops`` maps op names the platform's plugin asked to skip to the plugin's reason.
    ``quick`` selects the smaller grids. Input tensors are generated on the host and moved
    to :attr:`device`.
    """

    platform: Platform
    availability: Availability
    capabilities: PlatformCapabilities
    catalog: PluginCatalog
    quick: bool = False
    skip_ops: dict[str, str] = field(default_factory=dict)
    #: refused cases per test and implementation run anyway as claims probes
    probes_per_test: int = 1
    #: the performance tier's required fraction of the copy bandwidth (None: not requested)
    performance_fraction: float | None = None
    #: measurements shared by the tests of a run (the copy bandwidth)
    measurements: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The platform's name."""
        return self.platform.name

    @property
    def device(self) -> torch.device:
        """Local device 0 of the platform, where every test runs."""
        return self.platform.device(0)

    def specs(self, op: str) -> list[KernelSpec]:
        """Every implementation of ``op`` that can run on the platform, native and fallback."""
        return [s for s in self.catalog.registry.for_platform(self.name) if s.op == op]

    def request(self, dtype: torch.dtype, **fields: Any) -> KernelRequest:
        """The :class:`KernelRequest` an engine on this platform would make for ``dtype``."""
        return KernelRequest(platform=self.name, device_type=self.platform.device_type,
                             dtype=dtype, platform_page_sizes=self.capabilities.kv_page_sizes,
                             **fields)

    def dtype_skip(self, dtype: torch.dtype) -> str | None:
        """Why ``dtype`` cannot be tested here, or None."""
        if dtype not in self.capabilities.dtypes:
            declared = ", ".join(DTYPE_NAMES.get(d, str(d)) for d in self.capabilities.dtypes)
            return f"platform {self.name} does not declare dtype " \
                   f"{DTYPE_NAMES.get(dtype, dtype)} (declares {declared})"
        return None

    def page_size_skip(self, page_size: int) -> str | None:
        """Why KV page size ``page_size`` cannot be tested here, or None."""
        allowed = self.capabilities.kv_page_sizes
        if allowed is not None and page_size not in allowed:
            return f"platform {self.name} does not declare KV page size {page_size} " \
                   f"(declares {', '.join(map(str, allowed))})"
        return None

    def candidate_page_sizes(self, op: str, defaults: tuple[int, ...]) -> tuple[int, ...]:
        """``defaults``, then the platform's declared page sizes, then every implementation's
        own ``page_sizes``, without repeats."""
        sizes = list(defaults) + list(self.capabilities.kv_page_sizes or ())
        for spec in self.specs(op):
            sizes += list(spec.page_sizes or ())
        return tuple(dict.fromkeys(sizes))


def open_context(name: str, quick: bool = False, probes_per_test: int = 1,
                 performance_fraction: float | None = None) -> ConformanceContext:
    """Load every plugin and select platform ``name``. Raises :class:`ConformanceSetupError`
    (one line plus the platform table) when it is unknown or unavailable, or when
    ``performance_fraction`` is not in (0, 1]."""
    if performance_fraction is not None and not 0.0 < performance_fraction <= 1.0:
        raise ConformanceSetupError(f"--conformance-performance {performance_fraction}: the "
                                    "fraction of the copy bandwidth must be in (0, 1]")
    catalog = load_plugins()
    try:
        platform = catalog.select(name)
    except PlatformSelectionError as exc:
        raise ConformanceSetupError(f"cannot run the conformance suite: {exc}") from None
    availability = catalog.platforms[platform.name].availability
    try:
        capabilities = platform.capabilities()
    except Exception as exc:
        raise ConformanceSetupError(
            f"platform {name}: capabilities() raised {type(exc).__name__}: {exc}") from None
    skip_ops = _parse_skip_ops(catalog.conformance_options.get(platform.name, {}))
    platform.set_device(0)
    return ConformanceContext(platform, availability, capabilities, catalog, quick, skip_ops,
                              probes_per_test, performance_fraction)
