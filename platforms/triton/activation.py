"""Triton gated activations: SiLU-and-mul and GELU-and-mul (contracts in ``core/kernels/ops.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heteroserve.platforms.triton.jit_math import gate_activation
from heteroserve.platforms.triton.pdl import pdl_args, wait_for_previous

_GELU_APPROXIMATIONS = ("none", "tanh")
_BLOCK = 1024


@triton.jit
def _gated_kernel(
    x_ptr, y_ptr, stride_x, stride_y, inter,
    ACT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    a = gate_activation(g, ACT)
    tl.store(y_ptr + row * stride_y + offs, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, act: str, op: str) -> torch.Tensor:
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: last dim must be even ([gate | up]), got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        grid = (x2.shape[0], triton.cdiv(inter, _BLOCK))
        _gated_kernel[grid](x2, y, x2.stride(0), y.stride(0), inter, ACT=act, BLOCK=_BLOCK,
                            num_warps=4, **pdl_args(x.device))
    return y.view(*x.shape[:-1], inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2I]`` = ``[gate | up]`` -> ``silu(gate) * up`` ``[..., I]`` in ``x.dtype``
    (fp32 math). Raises ``ValueError`` for an odd last dimension."""
    return _launch(x, "silu", "silu_and_mul")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``x [..., 2I]`` -> ``gelu(gate, approximate) * up`` ``[..., I]``; ``approximate`` is
    ``"none"`` (erf) or ``"tanh"``, anything else raises ``ValueError``."""
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"gelu_and_mul: approximate must be one of {_GELU_APPROXIMATIONS}, "
                         f"got {approximate!r}")
    return _launch(x, "gelu" if approximate == "none" else "gelu_tanh", "gelu_and_mul")
