"""NCCL collectives: the generic torch.distributed communicator, checked to run on NCCL."""

from __future__ import annotations

import torch.distributed as dist

from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator


class NcclCommunicator(TorchDistributedCommunicator):
    """:class:`TorchDistributedCommunicator` over a process group whose backend is NCCL.

    Raises ``ValueError`` when a multi-rank group uses another backend (CUDA tensors through
    gloo would silently copy through the host). Single-rank groups touch no library."""

    def __init__(self, group: object | None = None) -> None:
        super().__init__(group)
        if self.world_size > 1:
            backend = str(dist.get_backend(group)).lower()
            if "nccl" not in backend:
                raise ValueError(f"cuda platform: the process group uses backend {backend!r}; "
                                 "initialise torch.distributed with backend='nccl'")
