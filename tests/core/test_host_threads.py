"""--cpu-threads: parsing, per-rank planning and applying to torch's intra-op pool."""

from __future__ import annotations

import os

import pytest
import torch

from heteroserve.core.runtime.host_threads import (
    HostThreads, apply_cpu_threads, parse_core_list, plan_cpu_threads,
)


def test_core_lists_parse_and_bad_ones_name_the_flag() -> None:
    assert parse_core_list("0-3,8") == (0, 1, 2, 3, 8)
    assert parse_core_list("2, 2,1") == (2, 1)
    for bad in ("a", "3-1", "-1", "0-"):
        with pytest.raises(ValueError, match="--cpu-threads"):
            parse_core_list(bad)


def test_plans() -> None:
    owned = len(os.sched_getaffinity(0))
    assert plan_cpu_threads("auto", torch_default=64) == HostThreads(min(64, owned), None)
    assert plan_cpu_threads("auto", torch_default=1) == HostThreads(1, None)
    assert plan_cpu_threads("auto", 1, 4 * owned, torch_default=64).threads == 1  # never 0
    assert plan_cpu_threads("3") == HostThreads(3, None)
    assert plan_cpu_threads("0-1|2-5", tp_rank=1, tp_size=2) == HostThreads(4, (2, 3, 4, 5))
    assert "bound to cores 2,3" in HostThreads(2, (2, 3)).describe()
    with pytest.raises(ValueError, match="2 core lists for 3"):
        plan_cpu_threads("0|1", tp_rank=0, tp_size=3)
    with pytest.raises(ValueError, match=">= 1"):
        plan_cpu_threads("0")


def test_apply_sets_torch_threads_and_binds() -> None:
    before, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    first = min(affinity)
    try:
        assert apply_cpu_threads("1") == HostThreads(1, None)
        assert torch.get_num_threads() == 1
        assert apply_cpu_threads(f"{first}-{first}").cores == (first,)  # a bare number counts
        assert os.sched_getaffinity(0) == {first}
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(before)
