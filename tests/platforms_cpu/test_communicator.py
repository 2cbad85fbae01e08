"""TorchDistributedCommunicator: single-rank short-circuit and a 2-process gloo run of every
collective."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from heteroserve.platforms.cpu.communicator import TorchDistributedCommunicator
from heteroserve.platforms.cpu.platform import CpuPlatform


def test_single_rank_without_init() -> None:
    assert not dist.is_initialized()
    comm = CpuPlatform().make_communicator()
    assert isinstance(comm, TorchDistributedCommunicator)
    assert (comm.rank, comm.world_size) == (0, 1)
    x = torch.arange(6.0).view(2, 3)
    for out in (comm.all_reduce(x), comm.all_gather(x, 0), comm.reduce_scatter(x, 1),
                comm.all_to_all(x), comm.broadcast(x, 0)):
        assert torch.equal(out, torch.arange(6.0).view(2, 3))
    comm.barrier()
    with pytest.raises(ValueError, match="src"):
        comm.broadcast(x, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        comm = TorchDistributedCommunicator()
        assert (comm.rank, comm.world_size) == (rank, world)
        base = torch.arange(12.0).view(4, 3)
        x = base + 100 * rank
        # all_reduce (non-contiguous input too)
        assert torch.equal(comm.all_reduce(x.clone()), 2 * base + 100)
        assert torch.equal(comm.all_reduce(x.clone().t()), (2 * base + 100).t())
        # all_gather along the last and the first dim
        assert torch.equal(comm.all_gather(x), torch.cat([base, base + 100], dim=-1))
        assert torch.equal(comm.all_gather(x, dim=0), torch.cat([base, base + 100], dim=0))
        # reduce_scatter along dim 0 and dim 1
        total = 2 * base + 100
        assert torch.equal(comm.reduce_scatter(x.clone(), 0), total[2 * rank:2 * rank + 2])
        y = torch.arange(8.0).view(2, 4) * (rank + 1)
        want = (3 * torch.arange(8.0).view(2, 4))[:, 2 * rank:2 * rank + 2]
        assert torch.equal(comm.reduce_scatter(y, 1), want)
        # all_to_all: chunk j goes to rank j, received chunks in source order
        got = comm.all_to_all(x)
        assert torch.equal(got, torch.cat([base[2 * rank:2 * rank + 2],
                                           (base + 100)[2 * rank:2 * rank + 2]]))
        # broadcast from rank 1, in place
        z = x.clone()
        assert comm.broadcast(z, src=1) is z and torch.equal(z, base + 100)
        try:
            comm.reduce_scatter(torch.zeros(3, 2), 0)
            raise AssertionError("reduce_scatter accepted an indivisible dim")
        except ValueError:
            pass
        comm.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_gloo() -> None:
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
