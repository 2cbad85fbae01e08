"""Every collective of the platform's communicator at world sizes 4 and 2 (two 2-rank
subgroups of the same 4 processes), one process per rank (gloo on the CPU), against results
computed from every rank's inputs: all-reduce,
all-gather on two dims, reduce-scatter, all-to-all, broadcast from the first and last rank,
a refused reduce-scatter shape, and a barrier."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from heteroserve.conformance.cases.platform import WorldCase, world_cases
from heteroserve.conformance.checks import record_error
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.distributed_worker import RankJob, run_rank
from heteroserve.conformance.params import ConfParam, conformance

TIMEOUT_S = 180.0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    errors = [ln for ln in text if "Error" in ln]
    return (errors[-1] if errors else text[-1] if text else repr(exc))[:400]


@conformance(world_cases, impl="make_communicator")
def test_collectives(conf: ConfParam, ctx: ConformanceContext, tmp_path: Path,
                     request: pytest.FixtureRequest) -> None:
    case: WorldCase = conf.case  # type: ignore[assignment]
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    ws = case.world_size
    if len({ctx.platform.device(r) for r in range(ws)}) > 1:  # one device per rank
        have = len(ctx.availability.devices)
        if have < 2:
            pytest.skip(f"collectives need 2 devices; {ctx.name} has {have}")
        ws = min(ws, 2 if have < 4 else 4)
    job = RankJob(ctx.name, ws, str(tmp_path / "store"), case.dtype, case.seed)
    procs = mp.start_processes(run_rank, args=(job,), nprocs=ws, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not procs.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"collectives at world size {ws} did not finish in "
                            f"{TIMEOUT_S:.0f} s", pytrace=False)
    except mp.ProcessRaisedException as exc:
        pytest.fail(_one_line(exc), pytrace=False)
    except mp.ProcessExitedException as exc:
        pytest.fail(f"a rank of world size {ws} died: {exc}", pytrace=False)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    record_error(request, 0.0)
