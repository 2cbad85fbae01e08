"""Continuous batching with chunked prefill, a radix prefix cache and retraction.

Each :meth:`Scheduler.step` runs one forward pass: an *extend* batch (new requests and
continuing chunks, up to ``chunked_prefill_size`` tokens) when there is prefill work that
fits, otherwise a *decode* batch of every running request (with ``--enable-mixed-chunk``
the running requests past their prompt also take their next token in the extend batch).
When a decode step cannot get KV pages even after evicting unlocked cache entries, the
newest running requests are retracted: their KV goes to the radix cache (or is freed), they
return to the front of the queue, and they later re-prefill prompt + outputs and continue
with identical sampling (randomness is keyed by seed and step).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from heteroserve.core.cache.page_allocator import PageAllocator
from heteroserve.core.cache.radix_cache import NoopPrefixCache, RadixCache
from heteroserve.core.config import ServerArgs
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.kernels.ops import SamplingBatch
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.model_runner.forward_batch import ForwardBatch
from heteroserve.core.model_runner.pooling import PoolingType
from heteroserve.core.platform import DeviceEvent
from heteroserve.core.scheduler import batch_sampling, overlap
from heteroserve.core.scheduler.grammar_step import GrammarStep
from heteroserve.core.scheduler.policy import order_waiting
from heteroserve.core.scheduler.outputs import FinishReason, StepOutput
from heteroserve.core.scheduler.request import Req, ReqState

logger = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work, from :meth:`Scheduler.schedule` to :meth:`Scheduler.update`:
    ``entries`` pairs each request with its new-token count, ``seqs`` are the runner's view
    of them (same order), ``ends[i]`` says whether entry ``i`` reaches the end of its known
    tokens this step, ``to_sample`` are the requests that get a token (in order), and
    ``forward`` is the device batch."""

    mode: ForwardMode
    entries: list[tuple[Req, int]]
    seqs: list[SequenceInput]
    ends: list[bool]
    to_sample: list[Req]
    forward: ForwardBatch


class StepRunner(Protocol):
    """What the scheduler needs from the model runner (the step boundary)."""

    page_size: int
    num_pages: int
    vocab_size: int
    max_context_len: int
    device: torch.device

    def forward(self, batch: ForwardBatch) -> torch.Tensor: ...

    def forward_pooled(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]: ...

    def sample(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor: ...

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                            rows: torch.Tensor) -> None: ...

    def new_event(self) -> DeviceEvent | None: ...
#: a queued request sharing at least this many uncached tokens with one being prefilled in
#: the same step waits a step and reuses that prefix from the cache instead of recomputing it
IN_BATCH_SHARE = 32


class Scheduler:
    """See the module docstring. ``model_runner`` provides ``forward``, ``sample``,
    ``apply_token_bitmask``, ``new_event``, ``page_size``, ``num_pages``, ``device``,
    ``vocab_size`` and ``max_context_len``."""

    def __init__(self, model_runner: StepRunner, server_args: ServerArgs, eos_token_ids: list[int],
                 page_size: int, tokenizer_info: Any | None = None,
                 think_end_id: int | None = None) -> None:
        self.runner, self.args = model_runner, server_args
        self.eos = set(eos_token_ids)
        self.page_size = page_size
        self.allocator = PageAllocator(model_runner.num_pages)
        self.cache = NoopPrefixCache(page_size) if server_args.disable_radix_cache \
            else RadixCache(page_size)
        self.grammar = GrammarStep(tokenizer_info, model_runner.vocab_size, think_end_id)
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.max_total_tokens = self.allocator.capacity * page_size
        self.max_context_len = model_runner.max_context_len
        self.max_running_requests = server_args.max_running_requests
        self._arrivals = itertools.count()
        self.overlap = (not server_args.disable_overlap_schedule
                        and model_runner.new_event() is not None)
        self._inflight: overlap.InflightDecode | None = None
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "cached_tokens": 0,
                         "retractions": 0, "overlapped_steps": 0, "decode_steps": 0}

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        """Queue ``req``. ``ValueError`` if it could never fit in the KV pool."""
        need = len(req.input_ids) + req.sampling_params.max_new_tokens
        if need > self.max_total_tokens:
            raise ValueError(f"request needs {need} KV slots but the pool holds "
                             f"{self.max_total_tokens}; shorten it")
        req.derive_seed(self.args.random_seed)
        req.arrival = next(self._arrivals)
        req.queued_at = time.monotonic()
        self.grammar.attach(req)
        self.counters["prompt_tokens"] += len(req.input_ids)
        self.waiting.append(req)

    def abort(self, rid: str) -> list[StepOutput]:
        """Drop ``rid`` wherever it is; returns its final output (empty if unknown)."""
        for queue in (self.waiting, self.running):
            for req in queue:
                if req.rid == rid:
                    queue.remove(req)
                    if req.state is ReqState.RUNNING:
                        self._release(req, cache_it=True)
                    return [self._finish(req, FinishReason.abort())]
        return []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    def flush_cache(self) -> int | None:
        """Empty the radix prefix cache (its pages go back to the pool, its hit counters
        restart) and return the number of pages freed; ``None`` (nothing done) while any
        request is queued or running, since their pages are locked in the cache."""
        if self.has_work():
            return None
        freed = self.cache.evict(self.cache.cached_pages)
        self.allocator.free(freed)
        self.cache.reset()
        return len(freed)

    # -- pages ---------------------------------------------------------------------------------
    def _alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        pages = self.allocator.alloc(n)
        if pages is None:
            self.allocator.free(self.cache.evict(n - self.allocator.num_free))
            pages = self.allocator.alloc(n)
        return pages

    def available_pages(self) -> int:
        """Pages an allocation could get now: free ones plus cached ones nobody holds."""
        return self.allocator.num_free + self.cache.evictable_pages()

    def _release(self, req: Req, cache_it: bool) -> None:
        """Give back ``req``'s KV: full pages into the cache when enabled, the rest freed."""
        if cache_it and self.cache.enabled:
            keep = req.kv_len // self.page_size  # >= num_prefix_pages: prefixes are full pages
            free = self.cache.insert(req.fill_ids[: keep * self.page_size], req.pages[:keep])
            free += req.pages[keep:]
        else:
            free = req.pages[req.num_prefix_pages:]
        self.allocator.free(free)
        if req.cache_node is not None:
            self.cache.dec_lock(req.cache_node)
        req.pages, req.num_prefix_pages, req.cache_node, req.kv_len = [], 0, None, 0
        req.prefilled = False

    def _cache_prefix(self, req: Req) -> None:
        """Share ``req``'s computed full pages right away (not only when it finishes), so
        requests with the same prefix queued behind it hit the cache on their next step."""
        keep = req.kv_len // self.page_size
        if keep <= req.num_prefix_pages:
            return
        ids = req.fill_ids[: keep * self.page_size]
        duplicates = self.cache.insert(ids, req.pages[:keep])
        match = self.cache.match_prefix(ids, count=False)
        self.cache.inc_lock(match.node)
        if req.cache_node is not None:
            self.cache.dec_lock(req.cache_node)
        req.pages = match.pages + req.pages[keep:]
        req.num_prefix_pages, req.cache_node = keep, match.node
        self.allocator.free(duplicates)

    # -- scheduling ----------------------------------------------------------------------------
    def _admit(self, req: Req) -> bool:
        """Match the prefix, lock it and move ``req`` to running; False if no room."""
        match = self.cache.match_prefix(req.fill_ids[: req.max_cached_prefix])
        self.cache.inc_lock(match.node)
        req.pages, req.num_prefix_pages = list(match.pages), len(match.pages)
        req.cache_node, req.kv_len = match.node, match.num_tokens
        req.cached_tokens = max(req.cached_tokens, match.num_tokens) if req.output_ids \
            else match.num_tokens
        req.state = ReqState.RUNNING
        if req.pool is not None:
            req.pool.reset()
        return True

    def grow_pages(self, req: Req, upto: int) -> bool:
        """Make ``req.pages`` cover ``upto`` tokens (evicting cache entries if needed); False
        when the pool cannot."""
        need = -(-upto // self.page_size) - len(req.pages)
        pages = self._alloc(need)
        if pages is None:
            return False
        req.pages += pages
        return True

    @staticmethod
    def _chunk(req: Req, budget: int) -> int:
        return min(req.pending_len, budget)

    def _prefill_batch(self) -> list[tuple[Req, int]]:
        """Requests to extend this step and how many tokens each: chunks in progress first,
        then waiting requests, within ``min(chunked_prefill_size, max_prefill_tokens)``
        tokens in all (as SGLang's two budgets; a longer prompt is chunked)."""
        budget = min(self.args.chunked_prefill_size, self.args.max_prefill_tokens)
        batch: list[tuple[Req, int]] = []
        for req in self.running:  # chunked prefills in progress come first
            if not req.prefilled and budget > 0:
                n = self._chunk(req, budget)
                if not self.grow_pages(req, req.kv_len + n):
                    break
                batch.append((req, n))
                budget -= n
        in_batch = RadixCache(self.page_size)  # prefixes being computed in this step
        for r, _ in batch:
            in_batch.insert(r.fill_ids, [0] * (len(r.fill_ids) // self.page_size))
        for req in order_waiting(self.waiting, self.args.schedule_policy, self.cache):
            if budget <= 0 or len(self.running) >= self.max_running_requests:
                break
            if self.cache.enabled and (req.embed is None or req.embed.reuses_prefix):
                shared = in_batch.match_prefix(req.fill_ids, count=False).num_tokens
                cached = self.cache.match_prefix(req.fill_ids, count=False).num_tokens
                if shared - cached >= IN_BATCH_SHARE:
                    continue  # wait one step: it will hit the prefix this step computes
            headroom = len(self.running)  # a page per running request for its next decode
            # an embedding request takes pages for its whole prompt at once: retracted
            # mid-prefill, it would have to pool (so recompute) every token again
            upfront = req.pending_len if req.embed is not None else self._chunk(req, budget)
            if self.available_pages() < -(-upfront // self.page_size) + headroom:
                break
            self._admit(req)
            n = self._chunk(req, budget)
            upto = len(req.fill_ids) if req.embed is not None else req.kv_len + n
            if not self.grow_pages(req, upto):
                self._release(req, cache_it=False)
                req.state = ReqState.WAITING
                break
            self.waiting.remove(req)
            self.running.append(req)
            if req.queue_time is None:
                req.queue_time = time.monotonic() - req.queued_at
            batch.append((req, n))
            in_batch.insert(req.fill_ids, [0] * (len(req.fill_ids) // self.page_size))
            budget -= n
        return batch

    def _riding_decodes(self, prefill: list[tuple[Req, int]]) -> list[tuple[Req, int]]:
        """``--enable-mixed-chunk``: the running requests past their prompt that get their
        next token in this extend step (one new token each, a slot allocated here); a request
        the pool has no page for waits for the next decode step, which may retract."""
        chosen = {id(r) for r, _ in prefill}
        return [(r, 1) for r in self.running
                if r.prefilled and id(r) not in chosen and r.kv_len < len(r.fill_ids)
                and self.grow_pages(r, r.kv_len + 1)]

    def _ensure_decode_pages(self) -> None:
        """Give every running request a slot for its next token, retracting if needed."""
        for req in sorted(self.running, key=lambda r: r.arrival):
            while req in self.running and not self.grow_pages(req, req.kv_len + 1):
                victim = max(self.running, key=lambda r: r.arrival)
                self._retract(victim)

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self._release(req, cache_it=True)
        req.state = ReqState.WAITING
        self.waiting.insert(0, req)
        self.counters["retractions"] += 1
        logger.info("KV pool full: retracted %s (%d tokens so far)", req.rid, len(req.output_ids))

    # -- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Run one forward pass and return what it produced (with overlap scheduling, what
        the previous decode step produced while this one runs): ``schedule()`` ->
        ``runner.forward`` -> ``update()``. Under inference mode, as the serving loop runs
        it: the step's batch tensors are inference tensors wherever the scheduler is driven
        from (a compiled model's graphs are traced on such tensors and guard on it)."""
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            if overlap.can_chain(self, done):
                self._inflight = overlap.launch_decode(self, list(self.running), done)
            return overlap.resolve(self, done)
        batch = self.schedule()
        if batch is None:
            return []
        if batch.forward.pooling is not None:
            return self.update(batch, *self.runner.forward_pooled(batch.forward))
        return self.update(batch, self.runner.forward(batch.forward))

    def schedule(self) -> ScheduledBatch | None:
        """Choose this step's work: an extend batch when prefill work fits, else a decode
        batch of every running request (None: nothing to run, or a decode step launched on
        the overlap path). Pages are allocated and grammar masks start filling here."""
        entries = self._prefill_batch()
        if entries:
            if self.args.enable_mixed_chunk:
                entries += self._riding_decodes(entries)
            seqs = [SequenceInput(r.fill_ids[r.kv_len:r.kv_len + n], r.kv_len, r.pages,
                                  all_logits=r.wants_prompt_logprobs and not r.prefilled,
                                  pool=r.pooling_upto(r.kv_len + n)) for r, n in entries]
            mode = ForwardMode.EXTEND
        else:
            self._ensure_decode_pages()
            entries = [(r, 1) for r in self.running]
            if not entries:
                return None
            if self.overlap and all(overlap.eligible(r) for r in self.running):
                self._inflight = overlap.launch_decode(self, list(self.running), None)
                return None
            # a request still prefilling (its chunk found no pages) advances one token here
            seqs = [SequenceInput([r.fill_ids[r.kv_len]], r.kv_len, r.pages,
                                  pool=r.pooling_upto(r.kv_len + 1)) for r, _ in entries]
            mode = ForwardMode.DECODE
            self.counters["decode_steps"] += 1
        ends = [r.kv_len + n == len(r.fill_ids) for r, n in entries]
        to_sample = [r for (r, _), end in zip(entries, ends)
                     if end and r.sampling_params.max_new_tokens > 0]
        self.grammar.start(to_sample)
        forward = build_forward_batch(seqs, mode, self.page_size, self.runner.device)
        return ScheduledBatch(mode, entries, seqs, ends, to_sample, forward)

    def update(self, batch: ScheduledBatch, logits: torch.Tensor,
               pooled: torch.Tensor | None = None) -> list[StepOutput]:
        """Account a forward pass of ``batch`` (``logits``: fp32, one row per
        ``SequenceInput.num_logit_rows``; ``pooled``: fp32 ``[P, hidden]``, one row per
        sequence with ``pool`` set, in order): advance KV lengths, cache computed prefixes,
        report prompt logprobs, pool hidden states, sample and finish; returns the
        per-request deltas."""
        outputs: list[StepOutput] = []
        sample_rows: list[int] = []
        row = 0
        pooled_row = 0
        for (r, n), seq, end in zip(batch.entries, batch.seqs, batch.ends):
            if seq.pool is not None and r.pool is not None and pooled is not None:
                r.pool.add(pooled[pooled_row], n if seq.pool is PoolingType.MEAN else 1)
                pooled_row += 1
            rows = seq.num_logit_rows
            if seq.all_logits:
                outputs.extend(self._prompt_logprobs(r, logits[row:row + rows]))
            if end and r.sampling_params.max_new_tokens > 0:
                sample_rows.append(row + rows - 1)
            row += rows
            r.kv_len += n
            if batch.mode is ForwardMode.EXTEND and self.cache.enabled and not r.prefilled:
                self._cache_prefix(r)  # a prompt chunk (not a decode riding along)
            r.prefilled = r.prefilled or r.kv_len == len(r.fill_ids)
            if end and r.sampling_params.max_new_tokens == 0:  # prompt only: no generation
                outputs.append(self._complete_prompt_only(r))
        if row != len(sample_rows) or row != logits.shape[0]:
            logits = logits[sample_rows]
        return outputs + self._sample_and_finish(logits, batch.to_sample)

    def _complete_prompt_only(self, req: Req) -> StepOutput:
        """Finish ``req`` after its prefill; an embedding request carries its embedding (or
        fails alone when it cannot be formed)."""
        if req.pool is None:
            return self._complete(req, FinishReason.of_length(0), StepOutput(req.rid))
        try:
            embedding = req.pool.result()
        except Exception as exc:  # one request's pooling, never the loop
            logger.warning("request %s failed: %s", req.rid, exc)
            return self._complete(req, FinishReason.error(f"{type(exc).__name__}: {exc}"),
                                  StepOutput(req.rid))
        return self._complete(req, FinishReason.of_length(0),
                              StepOutput(req.rid, embedding=embedding))

    def _prompt_logprobs(self, req: Req, logits: torch.Tensor) -> list[StepOutput]:
        """Report the prompt logprobs that this step's logits rows (positions ``kv_len``
        onwards of ``req``) determine; position 0 has none (reported as ``None``)."""
        values, tops = batch_sampling.prompt_logprobs(req, logits)
        if not values:
            return []
        start = req.prompt_logprob_next
        req.prompt_logprob_next = start + len(values)
        out = StepOutput(req.rid, prompt_logprobs=values, prompt_logprobs_start=start,
                         prompt_top_logprobs=tops if req.top_logprobs_num else None)
        self._fill_counts(out, req)
        return [out]

    def _sample_and_finish(self, logits: torch.Tensor, reqs: list[Req]) -> list[StepOutput]:
        if not reqs:
            self.grammar.apply(self.runner, logits)
            return []
        failed = batch_sampling.apply_penalties(logits, reqs, self.eos)
        self.grammar.apply(self.runner, logits)
        tokens = batch_sampling.sample(self.runner, logits, reqs)
        chosen, tops = batch_sampling.logprobs_of(logits, tokens, reqs)
        return self.accept_tokens(reqs, tokens.tolist(), chosen, tops, failed)

    def accept_tokens(self, reqs: list[Req], tokens: list[int], chosen: list[float | None],
                      tops: list[list[tuple[int, float]] | None],
                      failed: dict[int, str] | None = None) -> list[StepOutput]:
        """Append each request's sampled token and finish those that are done. ``failed``
        maps a row to why that request failed this step: it ends with an ``ERROR`` finish
        instead (its token is dropped), and the others go on."""
        outputs = []
        for i, (req, token) in enumerate(zip(reqs, tokens)):
            message = (failed or {}).get(i)
            if message is None:
                req.output_ids.append(token)
                try:
                    reason = self._finish_reason(req, token)
                except Exception as exc:  # one request's grammar or state, never the loop
                    req.output_ids.pop()
                    message = f"{type(exc).__name__}: {exc}"
            if message is not None:
                logger.warning("request %s failed: %s", req.rid, message)
                outputs.append(self._complete(req, FinishReason.error(message), StepOutput(req.rid)))
                continue
            self.counters["generation_tokens"] += 1
            out = StepOutput(req.rid, [token], None if chosen[i] is None else [chosen[i]],
                             None if tops[i] is None else [tops[i]])
            if reason is not None:
                self._complete(req, reason, out)
            self._fill_counts(out, req)
            outputs.append(out)
        return outputs

    def _complete(self, req: Req, reason: FinishReason, out: StepOutput) -> StepOutput:
        """Take running ``req`` out of the batch, cache its KV and set ``out``'s finish."""
        self.running.remove(req)
        self._release(req, cache_it=True)
        out.finish = self._finish(req, reason).finish
        self._fill_counts(out, req)
        return out

    def _finish_reason(self, req: Req, token: int) -> FinishReason | None:
        """Why ``req`` ends now that ``token`` was appended to its outputs, or None."""
        sp = req.sampling_params
        if self.grammar.advance(req, token):
            return FinishReason.stop(token)
        if sp.stop_token_ids and token in sp.stop_token_ids:
            return FinishReason.stop(token)
        if not sp.ignore_eos and token in self.eos:
            return FinishReason.stop(token)
        if len(req.output_ids) >= sp.max_new_tokens:
            return FinishReason.of_length(sp.max_new_tokens)
        if len(req.fill_ids) >= self.max_context_len:
            return FinishReason.of_length(len(req.output_ids))
        return None

    def _finish(self, req: Req, reason: FinishReason) -> StepOutput:
        req.state, req.finish = ReqState.FINISHED, reason
        self.counters["cached_tokens"] += req.cached_tokens
        out = StepOutput(req.rid, finish=reason)
        self._fill_counts(out, req)
        return out

    @staticmethod
    def _fill_counts(out: StepOutput, req: Req) -> None:
        out.cached_tokens, out.prompt_tokens = req.cached_tokens, len(req.input_ids)
        out.completion_tokens = len(req.output_ids)
        out.queue_time = req.queue_time

    def get_stats(self) -> dict[str, Any]:
        """A snapshot for metrics and logs. ``kv_usage`` (0..1) is the fraction of the pool
        that requests hold: evictable prefix-cache pages (cached, no running request on
        them) count as free, since any allocation may reclaim them; ``kv_used_pages``
        includes them. ``prefix_cache_queries_total`` / ``prefix_cache_hits_total`` are
        prompt tokens looked up in / found in the prefix cache (retracted requests count
        again when readmitted); ``num_retractions`` counts requests preempted for KV room."""
        used, evictable = self.allocator.num_used, self.cache.evictable_pages()
        held = used - evictable
        return {"num_running": len(self.running), "num_waiting": len(self.waiting),
                "kv_used_pages": used, "kv_total_pages": self.allocator.capacity,
                "kv_usage": held / self.allocator.capacity,
                "kv_cached_pages": self.cache.cached_pages,
                "kv_evictable_pages": evictable,
                "kv_request_pages": held,
                "cache_hit_rate": self.cache.hit_rate,
                "prefix_cache_queries_total": self.cache.queried_tokens,
                "prefix_cache_hits_total": self.cache.hit_tokens,
                "cached_tokens_total": self.counters["cached_tokens"],
                "prompt_tokens_total": self.counters["prompt_tokens"],
                "generation_tokens_total": self.counters["generation_tokens"],
                "num_retractions": self.counters["retractions"],
                "overlapped_steps": self.counters["overlapped_steps"],
                "decode_steps": self.counters["decode_steps"]}
