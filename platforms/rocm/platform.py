"""The AMD ROCm platform.

A ROCm build of torch reports ``torch.version.hip`` and drives AMD GPUs through the
``torch.cuda`` API (device type ``"cuda"``), HIP graphs through ``torch.cuda.CUDAGraph`` and
RCCL through torch.distributed's ``nccl`` backend name. aiter is optional and imported only by
the kernel modules that use it.

fp8: MI300-class GPUs (gfx942) have e4m3fnuz matrix units (max 240); MI350-class (gfx950) and
newer take OCP e4m3fn (max 448). The flavour is read from the GPU's ``gcnArchName``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import GraphRunner
from heteroserve.core.platform import (
    Availability, Fp8Flavour, KVLayout, Platform, PlatformCapabilities,
)
from heteroserve.platforms.cuda.device_services import TorchCudaDeviceServices

AITER_HINT = "pip install heteroserve[rocm] (amd-aiter) on a ROCm machine"
#: gfx9 architectures with e4m3fnuz fp8 (MI300A/MI300X/MI325X).
FNUZ_ARCHES = ("gfx940", "gfx941", "gfx942")


def aiter_missing() -> str | None:
    """Why ``aiter`` cannot be imported here, or None when it can (imports nothing)."""
    if "aiter" in sys.modules:
        return None
    try:
        found = importlib.util.find_spec("aiter") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"aiter is not installed ({AITER_HINT})"


def fp8_flavour_for_arch(arch: str) -> Fp8Flavour | None:
    """fp8 flavour of a ``gcnArchName`` such as ``"gfx942:sramecc+:xnack-"``: e4m3fnuz on
    gfx940-942, e4m3fn on gfx950 and later, None (no fp8 matrix units) on older GPUs."""
    base = arch.split(":")[0].strip()
    if base in FNUZ_ARCHES:
        return Fp8Flavour.E4M3FNUZ
    if base.startswith("gfx95") or base.startswith("gfx12"):
        return Fp8Flavour.E4M3FN
    return None


class RocmPlatform(TorchCudaDeviceServices, Platform):
    """AMD Instinct/Radeon GPUs on a ROCm build of torch."""

    name = "rocm"
    device_type = "cuda"  # ROCm builds of torch expose HIP devices as "cuda"
    priority = 100

    def detect(self) -> Availability:
        hip = getattr(torch.version, "hip", None)
        if not hip:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
            return Availability(False, f"this torch ({torch.__version__}) is a {build} build, "
                                       "not a ROCm build (install torch from the ROCm index)")
        try:
            count = torch.cuda.device_count()
        except Exception as exc:
            return Availability(False, f"torch.cuda.device_count() failed on ROCm {hip}: {exc}")
        if count == 0:
            return Availability(False, f"ROCm {hip} build of torch but no AMD GPU is visible "
                                       "(check rocm-smi and HIP_VISIBLE_DEVICES)")
        names = tuple(torch.cuda.get_device_name(i) for i in range(count))
        return Availability(True, f"{count} AMD GPU(s), ROCm {hip}", names)

    def gcn_arch(self) -> str:
        """``gcnArchName`` of device 0 (for example ``"gfx942:sramecc+:xnack-"``)."""
        return str(getattr(torch.cuda.get_device_properties(0), "gcnArchName", ""))

    def capabilities(self) -> PlatformCapabilities:
        arch = self.gcn_arch() if self.detect().available else ""
        return PlatformCapabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            fp8_flavour=fp8_flavour_for_arch(arch) if arch else None,
            kv_page_sizes=None,
            kv_layouts=(KVLayout.NHD, KVLayout.HND),
            graph_capture=True,
            distributed_backend="nccl",
            extra={"gcn_arch": arch or "unknown", "collectives": "RCCL (torch 'nccl' backend)",
                   "aiter": "available" if aiter_missing() is None else "not installed"},
        )

    def make_communicator(self, group: Any | None = None) -> Communicator:
        """RCCL collectives through torch.distributed (backend name ``"nccl"``)."""
        from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        """HIP graphs through the ``torch.cuda.CUDAGraph`` API."""
        from heteroserve.platforms.rocm.graph import HipGraphRunner

        return HipGraphRunner(device)
