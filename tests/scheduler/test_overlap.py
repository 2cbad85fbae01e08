"""Overlap scheduling gives exactly the synchronous results. The synchronous run has
``disable_overlap_schedule``; where the platform has no device events (the cpu), a no-op
event stands in, and on a device (``HETEROSERVE_TEST_PLATFORM``) its real events are used."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine_harness import cpu_args, run_scheduler
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model


def _with_events(runner, monkeypatch) -> None:
    """Overlap needs device events: the platform's own, or a no-op one on the host (whose
    copies complete before the call returns)."""
    if runner.new_event() is None:
        monkeypatch.setattr(runner.platform, "new_event", lambda: _HostEvent())


class _HostEvent:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 7}])
def test_overlap_equals_synchronous(tmp_path_factory, monkeypatch, sampling) -> None:
    path = build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=8)
    args = cpu_args(path)
    _, _, runner = build_model_runner(args)
    prompts = [list(range(4, 4 + n)) for n in (5, 18, 2, 33)]
    sync, _ = run_scheduler(replace(args, disable_overlap_schedule=True), prompts,
                            runner=runner, max_new_tokens=12, **sampling)
    _with_events(runner, monkeypatch)
    overlapped, sched = run_scheduler(args, prompts, runner=runner, max_new_tokens=12, **sampling)
    assert sched.overlap and sched.get_stats()["overlapped_steps"] > 5
    assert overlapped == sync
    assert sched.allocator.num_free + sched.cache.cached_pages == sched.allocator.capacity


def test_overlap_chains_while_waiting_requests_cannot_be_admitted(tmp_path_factory,
                                                                  monkeypatch) -> None:
    """Requests queue behind ``max_running_requests``: the decode steps of the running ones
    still chain (before, any waiting request made every step synchronous), and the tokens
    are the synchronous ones."""
    path = build_tiny_model(tmp_path_factory.mktemp("m"), "llama", seed=9)
    args = cpu_args(path, max_running_requests=2)
    _, _, runner = build_model_runner(args)
    prompts = [list(range(4, 4 + n)) for n in (5, 18, 2, 33, 9)]
    sync, _ = run_scheduler(replace(args, disable_overlap_schedule=True), prompts,
                            runner=runner, max_new_tokens=10)
    _with_events(runner, monkeypatch)
    overlapped, sched = run_scheduler(args, prompts, runner=runner, max_new_tokens=10)
    stats = sched.get_stats()
    # three admission rounds of up to two requests, each with about nine chained steps
    assert stats["overlapped_steps"] >= 20, stats
    assert overlapped == sync
    assert sched.allocator.num_free + sched.cache.cached_pages == sched.allocator.capacity
