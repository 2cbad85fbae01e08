"""Torch-native gated activations (contracts in ``core/kernels/ops.py``).

They run in the input dtype: ``silu``/``gelu`` evaluate in fp32 inside the kernel and round
once, the product rounds once more, and no fp32 copy of the activations is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GELU_APPROXIMATIONS = ("none", "tanh")


def _split_gate_up(x: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: last dim must be even ([gate | up]), got {x.shape[-1]}")
    gate, up = x.chunk(2, dim=-1)
    return gate, up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2I]`` = ``[gate | up]`` -> ``silu(gate) * up`` ``[..., I]`` in ``x.dtype``."""
    gate, up = _split_gate_up(x, "silu_and_mul")
    return F.silu(gate).mul_(up)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``x [..., 2I]`` -> ``gelu(gate, approximate) * up`` ``[..., I]`` in ``x.dtype``;
    ``approximate`` is ``"none"`` (erf) or ``"tanh"``, anything else raises ``ValueError``."""
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_and_mul: approximate must be one of {_GELU_APPROXIMATIONS}, "
                         f"got {approximate!r}")
    gate, up = _split_gate_up(x, "gelu_and_mul")
    return F.gelu(gate, approximate=approximate).mul_(up)
