"""Overlap scheduling: the host prepares and launches decode step N+1 while the device still
runs step N (as SGLang's overlap scheduler does).

Step N+1's input tokens are step N's sampled tokens, still on the device: the batch is built
with placeholders and the device tensor is copied in. Step N's tokens travel to pinned host
memory asynchronously and are read after N+1 has been queued; a request that step N
finished has one wasted token computed in N+1, which is discarded. Only plain decode batches
chain (no waiting prefill, no grammar, penalties or logprobs, no page shortage); everything
else takes the synchronous path, so the results are identical either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.scheduler import batch_sampling
from heteroserve.core.platform import DeviceEvent
from heteroserve.core.scheduler.outputs import StepOutput
from heteroserve.core.scheduler.request import Req, ReqState

if TYPE_CHECKING:
    from heteroserve.core.scheduler.scheduler import Scheduler


@dataclass
class InflightDecode:
    """A launched decode step whose tokens are not yet on the host."""

    reqs: list[Req]
    tokens: torch.Tensor  # device, int64 [B]
    host: torch.Tensor  # pinned host copy, valid once ``event`` completed
    event: DeviceEvent


def eligible(req: Req) -> bool:
    sp = req.sampling_params
    return (req.prefilled and req.grammar is None and not req.return_logprob
            and sp.max_new_tokens > 0
            # a lagging count (a token in flight) errs towards the synchronous path
            and not sp.processes_logits(len(req.output_ids)))


def admission_blocked(sched: Scheduler) -> bool:
    """True when ``schedule()`` would admit no waiting request now, so its next step is a
    decode of the running set whether or not the previous one is read back: nothing waits,
    the running set is at ``max_running_requests``, or fewer pages are free than the least
    any admission needs (one page for the new request plus one per running request, the
    headroom ``_prefill_batch`` keeps). Conservative: a False may still admit nothing."""
    if not sched.waiting or len(sched.running) >= sched.max_running_requests:
        return True
    return sched.available_pages() < 1 + len(sched.running)


def can_chain(sched: Scheduler, inflight: InflightDecode) -> bool:
    """Whether the next decode step may be launched before ``inflight`` is read back: the
    same running set, every request eligible, pages for the step, and no admission the
    synchronous path would make first (a request that finishes in ``inflight`` frees its
    slot one step later than on the synchronous path)."""
    if not admission_blocked(sched):
        return False
    if [id(r) for r in sched.running] != [id(r) for r in inflight.reqs]:
        return False
    if not all(eligible(r) for r in inflight.reqs):
        return False
    new_pages = sum(1 for r in inflight.reqs if r.kv_len % sched.page_size == 0)
    return new_pages <= sched.allocator.num_free


def launch_decode(sched: Scheduler, reqs: list[Req], previous: InflightDecode | None) -> InflightDecode:
    """Queue a decode step for ``reqs`` (pages must already cover one more slot each).
    With ``previous``, its device tokens are this step's inputs."""
    runner = sched.runner
    sched.counters["decode_steps"] += 1
    for r in reqs:
        sched.grow_pages(r, r.kv_len + 1)
    first = [0 if previous is not None else r.fill_ids[r.kv_len] for r in reqs]
    fb = build_forward_batch([SequenceInput([t], r.kv_len, r.pages) for t, r in zip(first, reqs)],
                             ForwardMode.DECODE, sched.page_size, runner.device)
    if previous is not None:
        fb.input_ids.copy_(previous.tokens)
        sched.counters["overlapped_steps"] += 1
    logits = runner.forward(fb)
    offset = 1 if previous is not None else 0
    tokens = batch_sampling.sample(runner, logits, reqs, step_offset=offset)
    for r in reqs:
        r.kv_len += 1
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=not tokens.is_cpu)
    host.copy_(tokens, non_blocking=True)
    event = runner.new_event()
    assert event is not None  # overlap is on only where the platform has events
    event.record()
    return InflightDecode(reqs, tokens, host, event)


def resolve(sched: Scheduler, inflight: InflightDecode) -> list[StepOutput]:
    """Wait for ``inflight``'s tokens and account them (skipping requests that finished in
    the meantime: their extra token is discarded)."""
    inflight.event.synchronize()
    live = [(r, t) for r, t in zip(inflight.reqs, inflight.host.tolist())
            if r.state is ReqState.RUNNING]
    return sched.accept_tokens([r for r, _ in live], [t for _, t in live],
                                [None] * len(live), [None] * len(live))
