"""``Scheduler.flush_cache`` (behind ``/flush_cache``): refused while requests are queued or
running; when idle it returns every cached page to the pool and later requests miss."""

from __future__ import annotations

from fake_runner import FakeModelRunner
from heteroserve.core.config import ServerArgs
from heteroserve.core.scheduler import Req, Scheduler
from heteroserve.core.scheduler.sampling_params import SamplingParams

PROMPT = list(range(1, 30))


def _run(sched: Scheduler, rid: str) -> int:
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    params.validate(sched.runner.vocab_size)
    sched.add_request(Req(rid=rid, input_ids=list(PROMPT), sampling_params=params))
    assert sched.flush_cache() is None  # queued: refused, nothing changed
    cached = 0
    while sched.has_work():
        for out in sched.step():
            if out.finish is not None:
                cached = out.cached_tokens
    return cached


def test_flush_cache_refused_while_busy_then_empties_the_cache() -> None:
    runner = FakeModelRunner(num_pages=64, page_size=4)
    sched = Scheduler(runner, ServerArgs(model_path="fake"), [], 4)
    assert _run(sched, "a") == 0
    assert _run(sched, "b") > 0  # the prompt's pages were cached
    cached_pages = sched.cache.cached_pages
    assert cached_pages > 0
    free_before = sched.allocator.num_free
    assert sched.flush_cache() == cached_pages
    assert sched.cache.cached_pages == 0 and sched.allocator.num_free == free_before + cached_pages
    assert sched.get_stats()["kv_used_pages"] == 0
    assert _run(sched, "c") == 0  # a miss after the flush
