"""The Communicator contract: collectives over one process group, provided by the platform.

The core's tensor-parallel layers call only these methods; the platform decides the library
(NCCL, RCCL, HCCL, XCCL, gloo) and any custom all-reduce.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Communicator(ABC):
    """Collectives over a fixed group of ``world_size`` ranks; this process is ``rank``.

    Every method is collective: all ranks call it in the same order with tensors of the same
    shape and dtype (except where a method says otherwise). Inputs live on the platform's
    device. With ``world_size == 1`` every method returns its input's values unchanged (a copy
    or the input itself) without touching any library, so single-device engines pay nothing.

    Errors: a shape that does not divide by ``world_size`` where a split is required raises
    ``ValueError`` before any communication starts.
    """

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks. Returns a tensor shaped like ``x`` (may be ``x`` itself,
        reduced in place)."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` in rank order; the result's ``dim`` is
        ``world_size`` times larger."""

    @abstractmethod
    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over ranks, then keep this rank's ``1/world_size`` slice along ``dim``.
        ``x.shape[dim]`` must divide by ``world_size``."""

    @abstractmethod
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Split ``x`` into ``world_size`` equal chunks along dim 0, send chunk ``j`` to rank
        ``j``; the result stacks the chunks received, in source-rank order, along dim 0."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank receives ``src``'s ``x``; returns it (written into ``x`` in place)."""

    def barrier(self) -> None:
        """Wait until every rank reaches this call."""
