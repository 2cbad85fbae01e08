"""Mixture-of-experts block: router, top-k routing and fused experts via the dispatch table."""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels.ops import MOE_PROCESS_WEIGHTS_ATTR
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.linear import ReplicatedLinear


class FusedMoE(nn.Module):
    """``E`` SiLU-and-mul experts stored as ``w13 [E, 2I, H]`` (gate rows, then up rows) and
    ``w2 [E, H, I]``; with tensor parallelism each rank holds ``I / tp`` of every expert and
    the output is all-reduced. Checkpoint tensors load per expert: ``load("w1"|"w3"|"w2",
    tensor, expert)`` (Mixtral names; Qwen's gate/up/down map onto them)."""

    def __init__(self, ctx: LayerContext, num_experts: int, top_k: int, hidden_size: int,
                 intermediate_size: int, renormalize: bool) -> None:
        super().__init__()
        if intermediate_size % ctx.tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by "
                             f"tensor-parallel size {ctx.tp_size}")
        self.ctx, self.top_k, self.renormalize = ctx, top_k, renormalize
        self.inter = intermediate_size // ctx.tp_size
        self.gate = ReplicatedLinear(ctx, hidden_size, num_experts, bias=False,
                                     scheme="unquantized")
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

    def process_weights_after_loading(self) -> None:
        """Let the ``fused_moe`` implementation convert the loaded experts to its own layout
        once (its optional ``process_weights_after_loading(w13, w2)``, see ``FusedMoEOp``)."""
        process = getattr(self.ctx.dispatch.fused_moe, MOE_PROCESS_WEIGHTS_ATTR, None)
        if process is None:
            return
        w13, w2 = process(self.w13.data, self.w2.data)
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.ctx.dispatch
        weights, ids = d.moe_topk_softmax(self.gate(x), self.top_k, self.renormalize)
        return self.ctx.all_reduce(d.fused_moe(x, self.w13, self.w2, weights, ids))
