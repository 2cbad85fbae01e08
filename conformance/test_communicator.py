"""The platform's communicator with ``world_size == 1``: every collective returns its input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from heteroserve.conformance.cases.platform import CommCase, communicator_cases
from heteroserve.conformance.checks import assert_bitwise_equal, record_error
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.distributed.communicator import Communicator


def _collectives(comm: Communicator) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    return {
        "all_reduce": comm.all_reduce,
        "all_gather(dim=-1)": lambda t: comm.all_gather(t, dim=-1),
        "all_gather(dim=0)": lambda t: comm.all_gather(t, dim=0),
        "reduce_scatter(dim=0)": lambda t: comm.reduce_scatter(t, dim=0),
        "all_to_all": comm.all_to_all,
        "broadcast(src=0)": lambda t: comm.broadcast(t, src=0),
    }


@conformance(communicator_cases, impl="make_communicator")
def test_communicator_world_size_1(conf: ConfParam, ctx: ConformanceContext, tmp_path: Path,
                                   request: pytest.FixtureRequest) -> None:
    case: CommCase = conf.case  # type: ignore[assignment]
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a torch.distributed process group is already initialised in this process")
    if case.init_group:
        dist.init_process_group(backend=ctx.capabilities.distributed_backend,
                                init_method=f"file://{tmp_path / 'store'}", rank=0,
                                world_size=1)
    try:
        comm = ctx.platform.make_communicator(None)
        assert (comm.rank, comm.world_size) == (0, 1), \
            f"rank/world_size {comm.rank}/{comm.world_size}, expected 0/1"
        x = randn(case.generator(), 4, 6, dtype=case.dtype, device=ctx.device)
        for name, call in _collectives(comm).items():
            assert_bitwise_equal(call(x.clone()), x, f"{name} with world_size 1")
        comm.barrier()
        record_error(request, 0.0)
    finally:
        if case.init_group and dist.is_initialized():
            dist.destroy_process_group()
