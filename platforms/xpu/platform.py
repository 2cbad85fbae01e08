"""The Intel XPU platform (Data Center GPU Max, Arc): ``torch.xpu``, optionally IPEX.

Every op stands on ``torch.xpu`` alone: the torch-native implementations run on the ``xpu``
device. intel-extension-for-pytorch (IPEX) adds fused kernels when importable, but its
development ended with 2.8 and each IPEX release requires one exact torch version (2.8.x for
IPEX 2.8), so on newer torch the platform runs without it. Collectives use torch.distributed's
``xccl`` backend (torch >= 2.8); graph capture uses ``torch.xpu.XPUGraph`` where this torch has
it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from typing import Any

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import EagerGraphRunner, GraphRunner
from heteroserve.core.platform import (
    Availability, Fp8Flavour, KVLayout, Platform, PlatformCapabilities,
)

IPEX_MODULE = "intel_extension_for_pytorch"
IPEX_DIST = "intel-extension-for-pytorch"
IPEX_HINT = ("optional: pip install intel-extension-for-pytorch==<the release built for this "
             "torch's major.minor>; heteroserve[xpu] does not pull it, so it never brings a "
             "second torch")


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")[:2]
    return tuple(int(p) for p in parts if p.isdigit())


def _ipex_version() -> str | None:
    """IPEX's version from the imported module or its distribution metadata (imports
    nothing); None when neither says."""
    module = sys.modules.get(IPEX_MODULE)
    version = getattr(module, "__version__", None) if module is not None else None
    if version is None:
        try:
            version = importlib.metadata.version(IPEX_DIST)
        except importlib.metadata.PackageNotFoundError:
            return None
    return str(version)


def ipex_missing() -> str | None:
    """Why IPEX cannot be used here, or None when it can (imports nothing): not installed,
    or a release built for another torch (each IPEX release pins one torch major.minor, and
    importing a mismatched one breaks); then every op runs on ``torch.xpu`` alone."""
    if IPEX_MODULE not in sys.modules:
        try:
            found = importlib.util.find_spec(IPEX_MODULE) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"intel-extension-for-pytorch is not installed ({IPEX_HINT})"
    version = _ipex_version()
    if version is not None and _major_minor(version) != _major_minor(torch.__version__):
        return (f"intel-extension-for-pytorch {version} is built for torch "
                f"{'.'.join(map(str, _major_minor(version)))}, this is torch {torch.__version__}"
                " (the xpu platform runs on torch.xpu alone)")
    return None


def _xpu() -> Any | None:
    xpu = getattr(torch, "xpu", None)
    return xpu if xpu is not None and hasattr(xpu, "is_available") else None


class XpuPlatform(Platform):
    """Intel GPUs through ``torch.xpu``."""

    name = "xpu"
    device_type = "xpu"
    priority = 100

    def detect(self) -> Availability:
        xpu = _xpu()
        if xpu is None:
            return Availability(False, f"torch {torch.__version__} has no torch.xpu "
                                       "(XPU needs torch >= 2.5 built for XPU)")
        try:
            available = bool(xpu.is_available())
        except Exception as exc:
            return Availability(False, f"torch.xpu.is_available() failed: {exc}")
        if not available:
            built = bool(getattr(torch._C, "_has_xpu", False))
            why = ("no Intel GPU is visible (check the Level Zero driver, "
                   "ZE_AFFINITY_MASK and sycl-ls)" if built else
                   f"torch {torch.__version__} is not an XPU build "
                   "(install torch from the XPU wheel index)")
            return Availability(False, f"torch.xpu is not available: {why}")
        count = int(xpu.device_count())
        names = tuple(str(xpu.get_device_name(i)) for i in range(count))
        ipex = ipex_missing()
        return Availability(True, f"{count} Intel GPU(s); "
                                  + (f"IPEX unused: {ipex}" if ipex else "IPEX kernels enabled"),
                            names)

    def capabilities(self) -> PlatformCapabilities:
        xpu = _xpu()
        return PlatformCapabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            fp8_flavour=Fp8Flavour.E4M3FN,
            kv_page_sizes=None,
            kv_layouts=(KVLayout.NHD, KVLayout.HND),
            graph_capture=xpu is not None and hasattr(xpu, "XPUGraph"),
            distributed_backend="xccl",
            extra={"ipex": "available" if ipex_missing() is None else "unused"},
        )

    # -- device services --------------------------------------------------------------------

    def set_device(self, index: int) -> None:
        torch.xpu.set_device(index)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        free, total = torch.xpu.mem_get_info(device)
        return int(free), int(total)

    def synchronize(self, device: torch.device | None = None) -> None:
        torch.xpu.synchronize(device)

    def empty_cache(self) -> None:
        torch.xpu.empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.xpu.manual_seed_all(seed)

    def new_stream(self, device: torch.device) -> Any | None:
        return torch.xpu.Stream(device)

    def new_event(self) -> Any | None:
        return torch.xpu.Event(enable_timing=True)

    def make_communicator(self, group: Any | None = None) -> Communicator:
        """Collectives through torch.distributed's ``xccl`` backend (oneCCL)."""
        from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        """``torch.xpu.XPUGraph`` capture where this torch has it, else eager."""
        xpu = _xpu()
        if xpu is None or not hasattr(xpu, "XPUGraph"):
            return EagerGraphRunner()
        from heteroserve.platforms.xpu.graph import XpuGraphRunner

        return XpuGraphRunner(device)
