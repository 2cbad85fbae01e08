"""The Intel XPU platform (Data Center GPU Max, Arc): ``torch.xpu``, optionally IPEX.

Every op stands on ``torch.xpu`` alone: the torch-native implementations run on the ``xpu``
device. intel-extension-for-pytorch (IPEX) adds fused kernels when importable, but its
development ended with 2.8 and each IPEX release requires one exact torch version (2.8.x for
IPEX 2.8), so on newer torch the platform runs without it. Collectives use torch.distributed's
``xccl`` backend (torch >= 2.8); graph capture uses ``torch.xpu.XPUGraph`` where this torch has
it.
"""

from __future__ import annotations

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
IPEX_HINT = ("pip install heteroserve[xpu] (intel-extension-for-pytorch; optional, and only "
             "for the exact torch version its release pins)")


def ipex_missing() -> str | None:
    """Why IPEX cannot be imported here, or None when it can (imports nothing)."""
    if IPEX_MODULE in sys.modules:
        return None
    try:
        found = importlib.util.find_spec(IPEX_MODULE) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"intel-extension-for-pytorch is not installed ({IPEX_HINT})"


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
        return Availability(True, f"{count} Intel GPU(s)", names)

    def capabilities(self) -> PlatformCapabilities:
        xpu = _xpu()
        return PlatformCapabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            fp8_flavour=Fp8Flavour.E4M3FN,
            kv_page_sizes=None,
            kv_layouts=(KVLayout.NHD, KVLayout.HND),
            graph_capture=xpu is not None and hasattr(xpu, "XPUGraph"),
            distributed_backend="xccl",
            extra={"ipex": "available" if ipex_missing() is None else "not installed"},
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
