"""The Ascend NPU platform (torch_npu).

torch_npu is imported only inside :meth:`NpuPlatform.detect` and the device services, never at
module import. Importing it registers ``torch.npu`` and the ``npu`` device type with torch.

Autoload: torch >= 2.5 imports every installed out-of-tree backend on ``import torch`` unless
``TORCH_DEVICE_BACKEND_AUTOLOAD=0``. An installed torch-npu without the CANN toolkit or an NPU
then breaks ``import torch`` itself. ``import heteroserve`` sets the variable to ``0`` (unless
the user set it) before anything imports torch, and :meth:`NpuPlatform.detect` imports
torch_npu explicitly, so NPU machines lose nothing and other machines keep a working torch.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import torch

from heteroserve.core.distributed.communicator import Communicator
from heteroserve.core.graph import EagerGraphRunner, GraphRunner
from heteroserve.core.platform import (
    Availability, KVLayout, Platform, PlatformCapabilities,
)

#: torch_npu's paged attention (npu_fused_infer_attention_score with block_table, the ATB
#: paged-attention ops) is used with 128-token blocks: the size CANN recommends and the one
#: every variant accepts (some require block_size <= 128, others a multiple of 128 with BSH).
NPU_PAGE_SIZE = 128
INSTALL_HINT = "pip install heteroserve[npu] and source the Ascend CANN toolkit's set_env.sh"


def npu_module_missing() -> str | None:
    """Why ``torch_npu`` cannot be imported here, or None when it can (imports nothing)."""
    if "torch_npu" in sys.modules:
        return None
    try:
        found = importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"torch_npu is not installed ({INSTALL_HINT})"


def _torch_npu() -> ModuleType:
    import torch_npu  # noqa: PLC0415  (vendor import stays inside the platform)

    return torch_npu


def _npu_namespace() -> Any:
    """``torch.npu``, which exists only after torch_npu was imported."""
    _torch_npu()
    return torch.npu  # type: ignore[attr-defined]


class NpuPlatform(Platform):
    """Ascend NPUs through torch_npu. Capabilities: fp16/bf16 (bf16 first), no fp8 matrix
    units (Atlas A2/A3), KV pages of exactly 128 tokens in NHD (viewed as torch_npu's BSH block
    layout ``[num_blocks, 128, kv_heads * head_size]``), NPU graph capture, HCCL."""

    name = "npu"
    device_type = "npu"
    priority = 100

    def detect(self) -> Availability:
        missing = npu_module_missing()
        if missing:
            return Availability(False, missing)
        try:
            npu = _npu_namespace()
        except Exception as exc:  # torch_npu raises when CANN is absent or mismatched
            return Availability(False, f"torch_npu failed to import: {type(exc).__name__}: "
                                       f"{exc} (is CANN's set_env.sh sourced?)")
        try:
            count = int(npu.device_count())
        except Exception as exc:
            return Availability(False, f"torch.npu.device_count() failed: {exc}")
        if count == 0:
            return Availability(False, "torch_npu is installed but no Ascend NPU is visible "
                                       "(check npu-smi and ASCEND_RT_VISIBLE_DEVICES)")
        names = tuple(str(npu.get_device_name(i)) for i in range(count))
        return Availability(True, f"{count} Ascend NPU(s)", names)

    def capabilities(self) -> PlatformCapabilities:
        return PlatformCapabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            fp8_flavour=None,
            kv_page_sizes=(NPU_PAGE_SIZE,),
            kv_layouts=(KVLayout.NHD,),
            graph_capture=True,
            distributed_backend="hccl",
            extra={"kv_cache_view": "BSH [num_blocks, 128, kv_heads*head_size]"},
        )

    # -- device services --------------------------------------------------------------------

    def set_device(self, index: int) -> None:
        _npu_namespace().set_device(index)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        free, total = _npu_namespace().mem_get_info(device)
        return int(free), int(total)

    def synchronize(self, device: torch.device | None = None) -> None:
        _npu_namespace().synchronize(device)

    def empty_cache(self) -> None:
        _npu_namespace().empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        _npu_namespace().manual_seed_all(seed)

    def new_stream(self, device: torch.device) -> Any | None:
        return _npu_namespace().Stream(device)

    def new_event(self) -> Any | None:
        return _npu_namespace().Event(enable_timing=True)

    def make_communicator(self, group: Any | None = None) -> Communicator:
        """Collectives over ``group`` through torch.distributed's ``hccl`` backend (the process
        group must have been initialised with ``backend="hccl"``)."""
        from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(group)

    def make_graph_runner(self, device: torch.device) -> GraphRunner:
        """NPU graphs (``torch.npu.NPUGraph``) where this torch_npu has them, else eager."""
        npu = _npu_namespace()
        if not hasattr(npu, "NPUGraph"):
            return EagerGraphRunner()
        from heteroserve.platforms.npu.graph import NpuGraphRunner

        return NpuGraphRunner(npu, device)
