"""Device facts the launchers size their grids with (cached per device)."""

from __future__ import annotations

import functools
import re

import torch


@functools.lru_cache(maxsize=16)
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors / compute units of ``device``; 64 where unknown (CPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).multi_processor_count)
    return 64


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    """The device's marketing name (``"NVIDIA H200"``), ``"cpu"`` for the CPU."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    return device.type


def table_stem(name: str) -> str:
    """A device name as a data file's stem, every character but letters and digits replaced
    by ``_`` (``"NVIDIA H200"`` -> ``"NVIDIA_H200"``): the per-device tuned tables' names."""
    return re.sub(r"[^A-Za-z0-9]", "_", name)
