"""The MyVendor platform. Import your vendor package only inside methods, never at module
level: ``heteroserve platforms`` must work on machines without your stack."""

from __future__ import annotations

import importlib.util

import torch

from heteroserve.core.graph import EagerGraphRunner, GraphRunner
from heteroserve.core.platform import (
    Availability, KVLayout, Platform, PlatformCapabilities,
)


class MyVendorPlatform(Platform):
    name = "myvendor"
    device_type = "myvendor"  # the torch device type your extension registers
    priority = 50  # above cpu (0) so that --platform auto prefers your device

    def detect(self) -> Availability:
        if importlib.util.find_spec("torch_myvendor") is None:
            return Availability(False, "torch_myvendor is not installed (pip install torch-myvendor)")
        import torch_myvendor  # noqa: F401  (registers the device with torch)

        count = torch.myvendor.device_count()  # type: ignore[attr-defined]
        if count == 0:
            return Availability(False, "no MyVendor device visible")
        return Availability(True, f"{count} device(s)", tuple(f"myvendor:{i}" for i in range(count)))

    def capabilities(self) -> PlatformCapabilities:
        return PlatformCapabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32), fp8_flavour=None,
            kv_page_sizes=(64,), kv_layouts=(KVLayout.NHD,), graph_capture=False,
            distributed_backend="gloo")

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return torch.myvendor.mem_get_info(device)  # type: ignore[attr-defined]

    def synchronize(self, device: torch.device | None = None) -> None:
        torch.myvendor.synchronize(device)  # type: ignore[attr-defined]

    def make_communicator(self, group: object | None = None):
        from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        return EagerGraphRunner()
