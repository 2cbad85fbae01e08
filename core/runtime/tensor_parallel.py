"""Tensor parallelism in the runtime: one scheduler process per rank, in lockstep.

Every rank runs the same scheduler over the same inputs, so every rank makes the same
decisions: global rank 0 receives requests from the frontend and broadcasts each loop
iteration's messages to the other ranks over a CPU (gloo) group; logits are gathered across
ranks before sampling, so every rank samples the same tokens; only rank 0 sends outputs.
The model's collectives run over the platform's backend (NCCL, RCCL, HCCL, XCCL or gloo),
reached only through the platform's :class:`Communicator`.
"""

from __future__ import annotations

import dataclasses
import datetime
import queue
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from heteroserve.core.config import ServerArgs


@dataclass
class RankInfo:
    """This process's place: ``rank`` in ``world_size`` (all nodes), ``local_rank`` on its
    node (its device index offset)."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def of(cls, args: ServerArgs, local_rank: int) -> RankInfo:
        per_node = ranks_per_node(args)
        return cls(args.node_rank * per_node + local_rank, local_rank, args.tp_size)


def ranks_per_node(args: ServerArgs) -> int:
    if args.tp_size % args.nnodes:
        raise ValueError(f"--tp-size {args.tp_size} is not divisible by --nnodes {args.nnodes}")
    return args.tp_size // args.nnodes


def with_init_addr(args: ServerArgs) -> ServerArgs:
    """Fill ``dist_init_addr`` with a free loopback port for a single-node group."""
    if args.tp_size == 1 or args.dist_init_addr:
        return args
    if args.nnodes > 1:
        raise ValueError("--dist-init-addr HOST:PORT is required with --nnodes > 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return dataclasses.replace(args, dist_init_addr=f"127.0.0.1:{port}")


@dataclass
class TPGroup:
    """The initialised process groups of one rank."""

    info: RankInfo
    cpu_group: Any
    communicator: Any

    def broadcast_messages(self, messages: list[Any]) -> list[Any]:
        """Rank 0's ``messages`` on every rank (others pass anything)."""
        box = [messages if self.info.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def min_across_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def init_tensor_parallel(args: ServerArgs, platform: Any, local_rank: int) -> TPGroup:
    """Join the process group named by ``dist_init_addr`` with the platform's backend, plus a
    gloo group for scheduler messages."""
    info = RankInfo.of(args, local_rank)
    platform.set_device(args.device_index + local_rank)
    backend = platform.capabilities().distributed_backend
    dist.init_process_group(backend=backend, init_method=f"tcp://{args.dist_init_addr}",
                            world_size=info.world_size, rank=info.rank,
                            timeout=datetime.timedelta(minutes=30))
    cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return TPGroup(info, cpu_group, platform.make_communicator(None))


class LockstepInbox:
    """The scheduler loop's message source under tensor parallelism: rank 0 drains its real
    inbox, and every rank receives the same list of messages per iteration."""

    def __init__(self, group: TPGroup, inbox: queue.Queue | None) -> None:
        self.group, self.inbox = group, inbox

    def take(self, block_s: float | None) -> list[Any]:
        messages: list[Any] = []
        if self.group.info.rank == 0 and self.inbox is not None:
            try:
                messages.append(self.inbox.get(timeout=block_s) if block_s else
                                self.inbox.get_nowait())
                while True:
                    messages.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
        return self.group.broadcast_messages(messages)
