"""Gated activation oracles."""

from __future__ import annotations

import math

import torch


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double().cpu()
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [T, 2I]`` -> float64 ``gate * sigmoid(gate) * up``."""
    gate, up = _split(x)
    return gate / (1.0 + torch.exp(-gate)) * up


def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """``x [T, 2I]`` -> float64 ``gelu(gate) * up``; ``approximate`` is ``none`` (erf) or
    ``tanh``."""
    gate, up = _split(x)
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate.pow(3))
        g = 0.5 * gate * (1.0 + torch.tanh(inner))
    elif approximate == "none":
        g = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
    else:
        raise ValueError(f"approximate must be none or tanh, got {approximate!r}")
    return g * up


def gated(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``x [T, 2I]`` -> float64 ``act(gate) * up`` for an ``activation`` of the linear
    contract's ``GATED_ACTIVATIONS`` (``silu``, ``gelu``, ``gelu_tanh``)."""
    if activation == "silu":
        return silu_and_mul(x)
    return gelu_and_mul(x, "tanh" if activation == "gelu_tanh" else "none")
