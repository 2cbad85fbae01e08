"""Reading and replacing a linear layer's parameters (shared by this package's linear methods)."""

from __future__ import annotations

import torch


def get_param(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """``layer.<name>`` as a tensor; ``ValueError`` naming the layer when it is missing."""
    tensor = getattr(layer, name, None)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"linear layer {type(layer).__name__} has no tensor {name!r}")
    return tensor


def set_param(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace or add the frozen parameter ``name`` of ``layer``."""
    if name in layer._parameters or hasattr(layer, name):
        delattr(layer, name)
    layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def drop_params(layer: torch.nn.Module, *names: str) -> None:
    """Remove the named parameters (those present) from ``layer``."""
    for name in names:
        if hasattr(layer, name):
            delattr(layer, name)


def rows(x: torch.Tensor, k: int, scheme: str) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` with a contiguous last dim; ``ValueError`` on a K mismatch."""
    if x.shape[-1] != k:
        raise ValueError(f"{scheme}: input has {x.shape[-1]} features, the layer expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()
