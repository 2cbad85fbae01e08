"""Test-only heteroserve plugin: vendor platforms presented as available, backed by the doubles.

Found through the on-disk entry point in ``heteroserve_vendor_doubles-0.1.0.dist-info`` once
``tests/vendor_doubles`` is on ``sys.path`` (``PYTHONPATH``). It provides nothing unless
``HETEROSERVE_TEST_DOUBLES`` names vendors (comma-separated: ``npu``, ``rocm``, ``xpu``,
``cuda`` (flashinfer), or ``all``). For each it provides a platform ``<vendor>-double`` that

- is the real platform class with CPU device services (device type ``cpu``, no graphs, gloo),
  so capabilities such as ``kv_page_sizes=(128,)`` for npu are the real ones;
- installs the vendor's double modules into ``sys.modules`` in ``detect()``;
- has exactly the kernel specs the real plugin registers (same ``supports``, same ``load``),
  registered for the ``-double`` platform name.

Run the conformance suite on them::

    PYTHONPATH=tests/vendor_doubles HETEROSERVE_TEST_DOUBLES=npu \
        heteroserve conformance --platform npu-double
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import EagerGraphRunner, GraphRunner
from heteroserve.core.kernels.registry import KernelRegistry, KernelSpec
from heteroserve.core.platform import Availability, Platform, PlatformCapabilities
from heteroserve.core.plugins import hookimpl
from heteroserve.platforms.cpu.platform import CpuPlatform
from heteroserve.platforms.cuda.platform import CudaPlatform
from heteroserve.platforms.npu.platform import NpuPlatform
from heteroserve.platforms.rocm.platform import RocmPlatform
from heteroserve.platforms.xpu.platform import XpuPlatform
from heteroserve_vendor_doubles import VENDORS, install

ENV = "HETEROSERVE_TEST_DOUBLES"
__heteroserve_source__ = "tests/vendor_doubles (test-only)"


class _CpuServices:
    """Device services of the CPU platform, for a vendor platform class run on doubles."""

    name: str
    vendor: str
    device_type = "cpu"
    priority = -1000  # never chosen by --platform auto

    _cpu = CpuPlatform()

    def detect(self) -> Availability:
        install(self.vendor)
        return Availability(True, f"{self.vendor} vendor doubles on CPU (documented semantics, "
                                  "not hardware)", ("cpu",))

    def capabilities(self) -> PlatformCapabilities:
        real = super().capabilities()  # type: ignore[misc]
        return replace(real, graph_capture=False, distributed_backend="gloo",
                       extra={**real.extra, "double": True})

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def set_device(self, index: int) -> None:
        """One CPU device."""

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return self._cpu.memory_info(device)

    def synchronize(self, device: torch.device | None = None) -> None:
        """CPU work is synchronous."""

    def empty_cache(self) -> None:
        """No device allocator."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def new_stream(self, device: torch.device) -> Any | None:
        return None

    def new_event(self) -> Any | None:
        return None

    def make_communicator(self, group: Any | None = None) -> Communicator:
        return self._cpu.make_communicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        return EagerGraphRunner()


class NpuDoublePlatform(_CpuServices, NpuPlatform):
    """``npu`` on the torch_npu double."""

    name, vendor = "npu-double", "npu"


class RocmDoublePlatform(_CpuServices, RocmPlatform):
    """``rocm`` on the aiter double (an e4m3fnuz, MI300-like device)."""

    name, vendor = "rocm-double", "rocm"

    def gcn_arch(self) -> str:
        return "gfx942:sramecc+:xnack-"


class XpuDoublePlatform(_CpuServices, XpuPlatform):
    """``xpu`` on the IPEX double."""

    name, vendor = "xpu-double", "xpu"


class CudaDoublePlatform(_CpuServices, CudaPlatform):
    """``cuda`` on the flashinfer double (only the flashinfer adapters are registered)."""

    name, vendor = "cuda-double", "cuda"


_PLATFORMS: dict[str, type[Platform]] = {
    "npu": NpuDoublePlatform, "rocm": RocmDoublePlatform, "xpu": XpuDoublePlatform,
    "cuda": CudaDoublePlatform}


def selected_vendors() -> list[str]:
    """Vendors named by ``HETEROSERVE_TEST_DOUBLES`` (``all`` means every one)."""
    raw = [v.strip() for v in os.environ.get(ENV, "").split(",") if v.strip()]
    if "all" in raw:
        return list(VENDORS)
    unknown = sorted(set(raw) - set(VENDORS))
    if unknown:
        raise ValueError(f"{ENV} names unknown vendor(s) {unknown}; known: {list(VENDORS)}")
    return raw


def double_kernel_specs(vendor: str) -> list[KernelSpec]:
    """The real plugin's specs for ``vendor``, registered for ``<vendor>-double``."""
    platform = f"{vendor}-double"
    if vendor == "npu":
        from heteroserve.platforms.npu.plugin import npu_kernel_specs

        return npu_kernel_specs(platform)
    if vendor == "rocm":
        from heteroserve.platforms.rocm.plugin import aiter_kernel_specs

        return aiter_kernel_specs(platform)
    if vendor == "cuda":
        from heteroserve.platforms.cuda.plugin import flashinfer_kernel_specs

        return flashinfer_kernel_specs(platform, device_type="cpu")
    from heteroserve.platforms.xpu.plugin import ipex_kernel_specs

    return ipex_kernel_specs(platform)


@hookimpl
def heteroserve_platforms() -> list[Platform]:
    return [_PLATFORMS[v]() for v in selected_vendors()]


@hookimpl
def heteroserve_register_kernels(registry: KernelRegistry) -> None:
    for vendor in selected_vendors():
        for spec in double_kernel_specs(vendor):
            registry.register(spec)
