"""Collectives over ``torch.distributed``, for any backend (gloo on the CPU).

Vendor platforms may subclass or replace this with a custom all-reduce; it is the generic
implementation every ``torch.distributed`` backend can run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from heteroserve.core.distributed.communicator import Communicator


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class TorchDistributedCommunicator(Communicator):
    """The :class:`Communicator` contract over one ``torch.distributed`` process group.

    ``group`` is a ``ProcessGroup`` (``None``: the default group). When ``torch.distributed``
    is not initialised the communicator is a single rank (``rank 0``, ``world_size 1``);
    with ``world_size == 1`` no method touches ``torch.distributed``.
    """

    def __init__(self, group: object | None = None) -> None:
        self.group = group
        if _dist_ready():
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
        elif group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        else:
            self.rank, self.world_size = 0, 1

    def _split_dim(self, x: torch.Tensor, dim: int, op: str) -> int:
        dim = dim % x.dim()
        if x.shape[dim] % self.world_size:
            raise ValueError(f"{op}: size {x.shape[dim]} of dim {dim} does not divide by "
                             f"world size {self.world_size}")
        return dim

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, in place on ``x`` (made contiguous first if needed)."""
        if self.world_size == 1:
            return x
        target = x if x.is_contiguous() else x.contiguous()
        dist.all_reduce(target, group=self.group)
        return target

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        dim = dim % x.dim()
        src = x.movedim(dim, 0).contiguous()
        out = torch.empty((self.world_size * src.shape[0], *src.shape[1:]), dtype=src.dtype,
                          device=src.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, src, group=self.group)
        return out.movedim(0, dim).contiguous()

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, keep this rank's slice along ``dim`` (``ValueError`` if it does not
        divide by the world size)."""
        if self.world_size == 1:
            return x
        dim = self._split_dim(x, dim, "reduce_scatter")
        src = x.movedim(dim, 0).contiguous()
        out = torch.empty((src.shape[0] // self.world_size, *src.shape[1:]), dtype=src.dtype,
                          device=src.device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        scatter(out, src, group=self.group)
        return out.movedim(0, dim).contiguous()

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Chunk ``j`` of dim 0 goes to rank ``j``; the result stacks received chunks in
        source-rank order (``ValueError`` if dim 0 does not divide by the world size)."""
        if self.world_size == 1:
            return x
        self._split_dim(x, 0, "all_to_all")
        src = x.contiguous()
        out = torch.empty_like(src)
        dist.all_to_all_single(out, src, group=self.group)
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank receives group rank ``src``'s ``x``, written into ``x`` in place."""
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast: src {src} is not a rank of a group of {self.world_size}")
        if self.world_size == 1:
            return x
        if not x.is_contiguous():
            raise ValueError("broadcast: x must be contiguous (it is written in place)")
        root = src if self.group is None else dist.get_global_rank(self.group, src)
        dist.broadcast(x, src=root, group=self.group)
        return x

    def barrier(self) -> None:
        """Wait until every rank of the group reaches this call."""
        if self.world_size > 1:
            dist.barrier(group=self.group)
