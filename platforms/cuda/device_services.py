"""Device services through torch's ``torch.cuda`` API, shared by the cuda platform and the
rocm platform (on ROCm builds of torch, ``torch.cuda`` drives HIP devices)."""

from __future__ import annotations

from typing import Any

import torch


class TorchCudaDeviceServices:
    """The :class:`~heteroserve.core.platform.Platform` device services via ``torch.cuda``."""

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)

    def synchronize(self, device: torch.device | None = None) -> None:
        torch.cuda.synchronize(device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def new_stream(self, device: torch.device) -> Any | None:
        return torch.cuda.Stream(device)

    def new_event(self) -> Any | None:
        return torch.cuda.Event(enable_timing=True)
