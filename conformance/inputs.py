"""Reproducible test inputs: drawn in float64 on the host from a case's generator, rounded
to the tested dtype, then moved to the device (so every platform sees the same values)."""

from __future__ import annotations

import torch


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device,
          scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """``shift + scale * N(0, 1)`` of ``shape`` in ``dtype`` on ``device``."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
    return x.to(dtype).to(device)


def distinct_logits(gen: torch.Generator, rows: int, cols: int, step: float = 0.25) -> torch.Tensor:
    """float64 ``[rows, cols]``: each row a random permutation of ``step * (0..cols-1)``
    centred on 0, so every selection boundary has a margin of ``step`` (exact in bf16 up to
    256 values)."""
    base = (torch.arange(cols, dtype=torch.float64) - cols / 2) * step
    return torch.stack([base[torch.randperm(cols, generator=gen)] for _ in range(rows)])
