"""Linear layers whose weights a :class:`~heteroserve.core.kernels.linear.LinearMethod` owns.

Tensor parallelism follows Megatron: column-parallel layers split output features across
ranks (no communication), row-parallel layers split input features and all-reduce their
output. Checkpoint tensors are full-size; each parameter's ``weight_loader`` slices this
rank's part (only for the parameters of the unquantized scheme and per-output-channel scales;
other quantized layouts load at ``tp_size == 1``).
"""

from __future__ import annotations

import torch
from torch import nn

from heteroserve.core.kernels.linear import LinearShape
from heteroserve.core.layers.context import LayerContext
from heteroserve.core.layers.norm import RMSNorm


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by tensor-parallel size {parts}")
    return n // parts


class LinearBase(nn.Module):
    """Holds the method's parameters for a ``[in_per_rank] -> [out_per_rank]`` projection.

    ``output_slices``: sizes of the fused output shards on this rank (q/k/v or gate/up) so
    that loaders can place each checkpoint tensor; ``shard_offsets`` are their start rows.
    """

    tp_dim: int | None = None  # 0: split outputs (column), 1: split inputs (row), None: replicated

    def __init__(self, ctx: LayerContext, input_size: int, output_size: int, bias: bool,
                 scheme: str | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.input_size, self.output_size = input_size, output_size
        self.method = ctx.dispatch.linear[scheme or ctx.quant_scheme]()
        specs = self.method.create_weights(LinearShape(input_size, output_size, ctx.dtype))
        for name, spec in specs.items():
            param = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype, device=ctx.device),
                                 requires_grad=False)
            self.register_parameter(name, param)
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=ctx.dtype, device=ctx.device),
                                 requires_grad=False) if bias else None

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    # -- loading -----------------------------------------------------------------------------
    def _rank_slice(self, tensor: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
        return tensor.narrow(dim, rank * size, size)

    def load(self, name: str, tensor: torch.Tensor, shard: int | str | None = None) -> None:
        """Copy this rank's part of checkpoint tensor ``tensor`` into parameter ``name``."""
        param = getattr(self, name)
        if param is None:
            raise ValueError(f"{type(self).__name__} has no parameter {name!r}")
        tensor = self._select(name, param, tensor, shard)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{name}: checkpoint shape {list(tensor.shape)} does not match "
                             f"{list(param.shape)}")
        param.data.copy_(tensor.to(param.dtype))

    def _select(self, name: str, param: torch.Tensor, tensor: torch.Tensor,
                shard: int | str | None) -> torch.Tensor:
        ctx = self.ctx
        if self.tp_dim is None or ctx.tp_size == 1 or tensor.dim() == 0 or tensor.numel() == 1:
            return tensor
        dim = self.tp_dim if tensor.dim() > 1 or self.tp_dim == 0 else None
        if dim is None:  # a row-parallel bias is added once, on the reduced output
            return tensor
        return self._rank_slice(tensor, dim, param.shape[dim], ctx.tp_rank)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer (routers, small projections)."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; ``forward`` returns this rank's slice."""

    tp_dim = 0

    def __init__(self, ctx: LayerContext, input_size: int, output_size: int, bias: bool,
                 scheme: str | None = None) -> None:
        super().__init__(ctx, input_size, _divide(output_size, ctx.tp_size, "output size"),
                         bias, scheme)

    def forward_rms_norm(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm`` then this projection: returns ``(self(norm(h)), h)`` with ``h = x +
        residual`` (``h = x`` without one), in one kernel where the method fuses the pair
        (:meth:`LinearMethod.apply_rms_norm`), else through ``norm`` (which may update ``x``
        and ``residual`` in place, as :class:`RMSNorm` does)."""
        fused = self.method.apply_rms_norm(self, x, residual, norm.weight, norm.eps, self.bias)
        if fused is not None:
            return fused
        if residual is None:
            return self(norm(x)), x
        normed, h = norm(x, residual)
        return self(normed), h


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the output is all-reduced (bias added once)."""

    tp_dim = 1

    def __init__(self, ctx: LayerContext, input_size: int, output_size: int, bias: bool,
                 scheme: str | None = None) -> None:
        super().__init__(ctx, _divide(input_size, ctx.tp_size, "input size"), output_size,
                         bias, scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return self.method.apply(self, x, self.bias)
        out = self.ctx.all_reduce(self.method.apply(self, x, None))
        return out if self.bias is None else out + self.bias

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``self(silu_and_mul(x))`` for ``x [T, 2 * input_size]`` = ``[gate | up]``, in one
        kernel where the method fuses the pair (:meth:`LinearMethod.apply_silu_and_mul`)."""
        bias = self.bias if self.ctx.tp_size == 1 else None
        out = self.method.apply_silu_and_mul(self, x, bias)
        if out is None:
            out = self.method.apply(self, self.ctx.dispatch.silu_and_mul(x), bias)
        if self.ctx.tp_size == 1:
            return out
        out = self.ctx.all_reduce(out)
        return out if self.bias is None else out + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused along outputs (gate and up). Shard ``i`` of
    the checkpoint fills rows ``sum(sizes[:i]) : sum(sizes[:i+1])`` of this rank's weight."""

    def __init__(self, ctx: LayerContext, input_size: int, output_sizes: list[int],
                 bias: bool, scheme: str | None = None) -> None:
        super().__init__(ctx, input_size, sum(output_sizes), bias, scheme)
        self.shard_sizes = [_divide(s, ctx.tp_size, "output size") for s in output_sizes]

    def _select(self, name, param, tensor, shard):
        if shard is None:
            return super()._select(name, param, tensor, shard)
        index = int(shard)
        size = self.shard_sizes[index]
        part = tensor.narrow(0, self.ctx.tp_rank * size, size) if self.ctx.tp_size > 1 else tensor
        full = param.data.clone()
        start = sum(self.shard_sizes[:index])
        full.narrow(0, start, size).copy_(part.to(full.dtype))
        return full


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; query heads split across ranks, KV heads split too or
    replicated when there are fewer KV heads than ranks."""

    def __init__(self, ctx: LayerContext, hidden_size: int, head_size: int, num_heads: int,
                 num_kv_heads: int, bias: bool, scheme: str | None = None) -> None:
        tp = ctx.tp_size
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_rank = ctx.tp_rank
        else:
            if tp % num_kv_heads:
                raise ValueError(f"tensor-parallel size {tp} is not a multiple of "
                                 f"num_key_value_heads={num_kv_heads}")
            self.num_kv_heads = 1
            self.kv_rank = ctx.tp_rank // (tp // num_kv_heads)
        self.head_size = head_size
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size
        LinearBase.__init__(self, ctx, hidden_size, out, bias, scheme)

    def _select(self, name, param, tensor, shard):
        if shard is None:
            return LinearBase._select(self, name, param, tensor, shard)
        q, kv = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        offset, size, rank = {"q": (0, q, self.ctx.tp_rank), "k": (q, kv, self.kv_rank),
                              "v": (q + kv, kv, self.kv_rank)}[shard]
        part = tensor.narrow(0, rank * size, size)
        full = param.data.clone()
        full.narrow(0, offset, size).copy_(part.to(full.dtype))
        return full
