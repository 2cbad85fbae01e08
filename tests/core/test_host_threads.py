"""--cpu-threads: parsing, per-rank planning and applying to torch's intra-op pool."""

from __future__ import annotations

import os

import pytest
import torch

import threading
from types import SimpleNamespace

from heteroserve.core.runtime import host_threads
from heteroserve.core.runtime.host_threads import (
    HostThreads, apply_cpu_threads, parse_core_list, pin_current_thread, plan_cpu_threads,
)
from heteroserve.core.runtime.scheduler_process import io_thread_cores


def test_core_lists_parse_and_bad_ones_name_the_flag() -> None:
    assert parse_core_list("0-3,8") == (0, 1, 2, 3, 8)
    assert parse_core_list("2, 2,1") == (2, 1)
    for bad in ("a", "3-1", "-1", "0-"):
        with pytest.raises(ValueError, match="--cpu-threads"):
            parse_core_list(bad)


def test_plans() -> None:
    owned = len(os.sched_getaffinity(0))
    expected = min(64, owned) - (owned >= host_threads.RESERVE_FROM_CORES)
    assert plan_cpu_threads("auto", torch_default=64) == HostThreads(expected, None)
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


def test_auto_leaves_one_core_to_host_threads_on_large_shares(monkeypatch) -> None:
    monkeypatch.setattr(host_threads, "_owned_cores", lambda: 16)
    assert plan_cpu_threads("auto", torch_default=64).threads == 15
    assert plan_cpu_threads("auto", torch_default=8).threads == 8  # torch already leaves room
    assert plan_cpu_threads("auto", 0, 2, torch_default=64).threads == 7  # 8 cores per rank
    assert plan_cpu_threads("auto", 0, 4, torch_default=64).threads == 4  # 4: no reserve
    monkeypatch.setattr(host_threads, "_owned_cores", lambda: 2)
    assert plan_cpu_threads("auto", torch_default=64).threads == 2


def test_binding_leaves_spare_cores_to_the_io_threads() -> None:
    before, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    if len(affinity) < 2:
        pytest.skip("needs two cores")
    first = min(affinity)
    try:
        plan = apply_cpu_threads(f"{first}-{first}")
        assert plan.spare_cores == tuple(sorted(affinity - {first}))
        assert "I/O threads on cores" in plan.describe()
        assert io_thread_cores(SimpleNamespace(runner=SimpleNamespace(host_threads=plan))) \
            == plan.spare_cores
        seen: list[set[int]] = []
        worker = threading.Thread(target=lambda: (pin_current_thread(plan.spare_cores),
                                                  seen.append(os.sched_getaffinity(0))))
        worker.start()
        worker.join()
        assert seen == [set(plan.spare_cores)]  # the thread moved ...
        assert os.sched_getaffinity(0) == {first}  # ... the compute thread did not
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(before)
    assert io_thread_cores(SimpleNamespace()) == ()
    pin_current_thread(())  # no-op


def test_scheduler_channel_with_its_io_thread_pinned_still_carries_messages() -> None:
    from heteroserve.core.runtime.transport import Channel

    front, addrs = Channel.bind()
    back = Channel.connect(addrs, (min(os.sched_getaffinity(0)),))
    try:
        back.send_when_connected({"ping": 1}, 2000)
        assert front.recv(2000) == {"ping": 1}
    finally:
        back.close()
        front.close()
