"""Mixture-of-experts block: router, top-k routing and fused experts via the dispatch table."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.linear import ReplicatedLinear
from heteroserve.core.quantization.base import QuantizationError


class FusedMoE(nn.Module):
    """``E`` SiLU-and-mul experts stored as ``w13 [E, 2I, H]`` (gate rows, then up rows) and
    ``w2 [E, H, I]``; with tensor parallelism each rank holds ``I / tp`` of every expert and
    the output is all-reduced. Checkpoint tensors load per expert: ``load("w1"|"w3"|"w2",
    tensor, expert)`` (Mixtral names; Qwen's gate/up/down map onto them)."""

    def __init__(self, ctx: LayerContext, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, renormalize: bool, prefix: str = "") -> None:
        super().__init__()
        if ctx.quant is not None and any(ctx.quant.experts_quantized(f"{prefix}.experts.0.{p}")
                                         for p in ("w1", "gate_proj")):
            raise QuantizationError(f"{prefix}.experts: quantized MoE experts "
                                    f"({ctx.quant.method}) are not supported yet; list them in "
                                    "the format's ignore list to keep them unquantized")
        if intermediate_size % ctx.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by "
                             f"tensor-parallel size {ctx.tp_size}")
        self.ctx, self.top_k, self.renormalize = ctx, top_k, renormalize
        self.inter = intermediate_size // ctx.tp_size
        self.gate = ReplicatedLinear(ctx, hidden_size, num_experts, bias=False,
                                     scheme="unquantized", prefix=f"{prefix}.gate")
        make = lambda *shape: nn.Parameter(  # noqa: E731
            torch.empty(*shape, dtype=ctx.dtype, device=ctx.device), requires_grad=False)
        self.w13 = make(num_experts, 2 * self.inter, hidden_size)
        self.w2 = make(num_experts, hidden_size, self.inter)

    def load(self, name: str, tensor: torch.Tensor, expert: int) -> None:
        r, i = self.ctx.tp_rank, self.inter
        if name == "w1":
            self.w13.data[expert, :i].copy_(tensor[r * i:(r + 1) * i])
        elif name == "w3":
            self.w13.data[expert, i:].copy_(tensor[r * i:(r + 1) * i])
        elif name == "w2":
            self.w2.data[expert].copy_(tensor[:, r * i:(r + 1) * i])
        else:
            raise ValueError(f"unknown expert weight {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ctx.dispatch
        weights, ids = d.moe_topk_softmax(self.gate(x), self.top_k, self.renormalize)
        return self.ctx.all_reduce(d.fused_moe(x, self.w13, self.w2, weights, ids))
