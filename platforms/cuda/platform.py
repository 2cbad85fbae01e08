"""The NVIDIA CUDA platform (``torch.cuda``)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
from typing import Any

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import GraphRunner
from heteroserve.core.platform import (
    Availability, Fp8Flavour, KVLayout, Platform, PlatformCapabilities,
)
from heteroserve.platforms.cuda.device_services import TorchCudaDeviceServices


def cuda_unavailable() -> str | None:
    """Why this process cannot use an NVIDIA GPU through torch, or None when it can."""
    if torch.version.hip is not None:
        return "torch is a ROCm (HIP) build; use --platform rocm"
    if torch.version.cuda is None:
        return "torch was built without CUDA (install a CUDA wheel of torch)"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    except Exception as exc:  # a broken driver raises from is_available on some versions
        return f"CUDA initialisation failed: {type(exc).__name__}: {exc}"
    return None


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class CudaPlatform(TorchCudaDeviceServices, Platform):
    """NVIDIA GPUs. Capabilities: bf16 (sm80+), fp16, fp32; fp8 e4m3fn on sm89+; any KV page
    size in NHD or HND; CUDA graph capture; NCCL. Services go through ``torch.cuda``."""

    name = "cuda"
    device_type = "cuda"
    priority = 100

    def detect(self) -> Availability:
        why = cuda_unavailable()
        if why:
            return Availability(False, why)
        count = torch.cuda.device_count()
        names = tuple(torch.cuda.get_device_name(i) for i in range(count))
        cap = torch.cuda.get_device_capability(0)
        return Availability(True, f"{count} CUDA device(s), compute capability "
                                  f"{cap[0]}.{cap[1]}, CUDA {torch.version.cuda}", names)

    def _capability(self) -> tuple[int, int] | None:
        if cuda_unavailable():
            return None
        return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]

    def capabilities(self) -> PlatformCapabilities:
        cap = self._capability()
        bf16 = cap is None or cap >= (8, 0)
        dtypes = ((torch.bfloat16,) if bf16 else ()) + (torch.float16, torch.float32)
        return PlatformCapabilities(
            dtypes=dtypes,
            fp8_flavour=Fp8Flavour.E4M3FN if cap is not None and cap >= (8, 9) else None,
            kv_page_sizes=None,
            kv_layouts=(KVLayout.NHD, KVLayout.HND),
            graph_capture=True,
            distributed_backend="nccl",
            extra={
                "compute_capability": None if cap is None else f"{cap[0]}.{cap[1]}",
                "triton": _installed("triton"),
                "flashinfer": _installed("flashinfer"),
                "triton_pdl": self._triton_pdl(),
            },
        )

    def _triton_pdl(self) -> bool:
        """Whether the Triton decode-chain kernels launch with programmatic dependent launch
        (``platforms/triton/pdl.py``) on device 0."""
        if cuda_unavailable() or not _installed("triton"):
            return False
        from heteroserve.platforms.triton.pdl import pdl_enabled

        return pdl_enabled(torch.device("cuda", 0))

    def runtime_versions(self) -> dict[str, str]:
        """CUDA runtime torch was built with, the driver (from nvidia-smi), NCCL, flashinfer."""
        out = {"cuda_runtime": str(torch.version.cuda)}
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                       text=True, capture_output=True, timeout=20)
                out["driver"] = query.stdout.strip().splitlines()[0] if query.stdout else "?"
            except (OSError, subprocess.SubprocessError):
                out["driver"] = "nvidia-smi failed"
        if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for dist in ("flashinfer-python", "triton"):
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        return out

    def make_communicator(self, group: Any | None = None) -> Communicator:
        """Collectives over ``group`` through torch.distributed's ``nccl`` backend."""
        from heteroserve.platforms.cuda.communicator import NcclCommunicator

        return NcclCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        from heteroserve.platforms.cuda.graph import CudaGraphRunner

        return CudaGraphRunner(device)
