"""The MyVendor platform. Import your vendor package only inside methods, never at module
level: ``heteroserve platforms`` must work on machines without your stack.

Simulate mode (``HETEROSERVE_MYVENDOR_SIMULATE=1``): the platform runs on the host CPU with
the torch-native kernels, so ``heteroserve conformance --platform myvendor`` passes on a laptop
before any device code exists. A simulated platform reports itself as such and is never
chosen by ``--platform auto``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from heteroserve.plugin_api import (
    Availability, Communicator, EagerGraphRunner, GraphRunner, KVLayout, Platform,
    PlatformCapabilities, TorchDistributedCommunicator,
)

SIMULATE_ENV = "HETEROSERVE_MYVENDOR_SIMULATE"


def simulating() -> bool:
    """Whether simulate mode is on (``HETEROSERVE_MYVENDOR_SIMULATE`` set to 1/true/yes)."""
    return os.environ.get(SIMULATE_ENV, "").strip().lower() in ("1", "true", "yes")


class MyVendorPlatform(Platform):
    name = "myvendor"
    priority = 50  # above cpu (0) so that --platform auto prefers your real device

    def __init__(self) -> None:
        self.simulated = simulating()
        # the torch device type your extension registers; the host CPU when simulating
        self.device_type = "cpu" if self.simulated else "myvendor"

    def detect(self) -> Availability:
        if self.simulated:
            return Availability(True, f"simulated on the host CPU ({SIMULATE_ENV}=1)",
                                ("host CPU (simulated myvendor)",), simulated=True)
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

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu") if self.simulated else torch.device(self.device_type, index)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        if self.simulated:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return total // 2, total
        return torch.myvendor.mem_get_info(device)  # type: ignore[attr-defined]

    def synchronize(self, device: torch.device | None = None) -> None:
        if not self.simulated:
            torch.myvendor.synchronize(device)  # type: ignore[attr-defined]

    def make_communicator(self, group: object | None = None) -> Communicator:
        return TorchDistributedCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        return EagerGraphRunner()
