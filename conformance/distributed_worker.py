"""One rank of the distributed conformance check (run in a fresh process per rank).

Every rank loads the plugins, selects the platform under test by name, joins a process group
of the platform's ``distributed_backend`` and runs every collective of the platform's
:class:`~heteroserve.core.distributed.communicator.Communicator` on integer-valued inputs
(so sums are exact in every dtype and results compare bit for bit with what each rank
computes from every rank's regenerated inputs). A mismatch raises ``AssertionError`` with one
line naming the collective, the rank and the world size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from heteroserve.core.distributed.communicator import Communicator


@dataclass(frozen=True)
class RankJob:
    """What every rank runs: the platform, the world, the store file, dtype and seed."""

    platform: str
    world_size: int
    store: str
    dtype: torch.dtype
    seed: int


def rank_input(job: RankJob, rank: int, rows: int, cols: int) -> torch.Tensor:
    """Rank ``rank``'s input: integers in [-8, 8) as ``job.dtype`` (host)."""
    gen = torch.Generator().manual_seed(job.seed * 1009 + rank)
    return torch.randint(-8, 8, (rows, cols), generator=gen).to(job.dtype)


def _check(name: str, rank: int, got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.detach().cpu()
    assert tuple(got.shape) == tuple(want.shape), \
        f"{name}, rank {rank}: shape {list(got.shape)}, expected {list(want.shape)}"
    assert got.dtype == want.dtype, f"{name}, rank {rank}: dtype {got.dtype}, expected {want.dtype}"
    bad = int((got != want).sum())
    assert bad == 0, f"{name}, rank {rank}: {bad} of {want.numel()} elements differ from the " \
        "expected result"


def _collectives(comm: Communicator, members: list[int], job: RankJob,
                 dev: torch.device) -> None:
    """Check every collective of ``comm``, whose group is the global ranks ``members`` (in
    group-rank order) of which this process is ``comm.rank``."""
    ws, rank = len(members), comm.rank
    what = f"world size {ws}" + ("" if ws == job.world_size else f" (group {members})")
    assert (comm.rank, comm.world_size) == (members.index(dist.get_rank()), ws), \
        f"make_communicator in {what}: rank/world_size {comm.rank}/{comm.world_size}"
    rows, cols = 4 * ws, 6
    inputs = [rank_input(job, r, rows, cols) for r in members]
    mine = inputs[rank]
    total = torch.stack([x.double() for x in inputs]).sum(0).to(job.dtype)
    chunk = rows // ws

    def run(name: str, fn: Callable[[torch.Tensor], torch.Tensor], want: torch.Tensor) -> None:
        _check(f"{name} in {what}", rank, fn(mine.clone().to(dev)), want)

    run("all_reduce", comm.all_reduce, total)
    run("all_gather(dim=-1)", lambda t: comm.all_gather(t, dim=-1), torch.cat(inputs, -1))
    run("all_gather(dim=0)", lambda t: comm.all_gather(t, dim=0), torch.cat(inputs, 0))
    run("reduce_scatter(dim=0)", lambda t: comm.reduce_scatter(t, dim=0),
        total[rank * chunk:(rank + 1) * chunk])
    run("all_to_all", comm.all_to_all,
        torch.cat([x[rank * chunk:(rank + 1) * chunk] for x in inputs], 0))
    for src in (0, ws - 1):
        run(f"broadcast(src={src})", lambda t, s=src: comm.broadcast(t, src=s), inputs[src])
    try:
        comm.reduce_scatter(torch.zeros(ws * 2 + 1, 3, dtype=job.dtype, device=dev), dim=0)
    except ValueError:
        pass
    else:
        raise AssertionError(f"reduce_scatter in {what}: {ws * 2 + 1} rows do not divide by "
                             f"{ws}, yet no ValueError was raised")
    comm.barrier()


def run_rank(rank: int, job: RankJob) -> None:
    """The body of one rank (``torch.multiprocessing`` calls it with ``rank`` first): the
    default group of ``job.world_size`` ranks, then, for an even world size above 2, the
    communicators of consecutive rank pairs (world size 2 over a subgroup)."""
    from heteroserve.core.plugins.manager import load_plugins

    platform = load_plugins().select(job.platform)
    platform.set_device(rank)
    dev = platform.device(rank)
    ws = job.world_size
    dist.init_process_group(backend=platform.capabilities().distributed_backend,
                            init_method=f"file://{job.store}", rank=rank, world_size=ws)
    try:
        _collectives(platform.make_communicator(None), list(range(ws)), job, dev)
        if ws > 2 and ws % 2 == 0:
            pairs = [[r, r + 1] for r in range(0, ws, 2)]
            groups = [dist.new_group(p) for p in pairs]  # every rank creates every group
            mine = rank // 2
            _collectives(platform.make_communicator(groups[mine]), pairs[mine], job, dev)
    finally:
        dist.destroy_process_group()
