"""Frontend-side state of one (sub-)request: detokenization, stop strings and logprob text,
turning the scheduler's :class:`StepOutput` deltas into :class:`RequestOutput` deltas.

A :class:`RequestState` buffers what arrived since it last emitted and hands a
:class:`RequestOutput` to its ``sink`` when one is due: every ``stream_interval`` generated
tokens while streaming, whenever prompt logprobs arrive while streaming, and always on
finish. Nothing cumulative is ever copied: each emitted output holds the buffer and the
buffer starts empty again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from heteroserve.core.runtime.outputs import RequestOutput, TokenLogprob, Usage
from heteroserve.core.scheduler.outputs import FinishKind, FinishReason, StepOutput, TopEntry
from heteroserve.core.tokenizer import IncrementalDetokenizer, Tokenizer

Sink = Callable[[RequestOutput], None]


@dataclass
class RequestOptions:
    """What the frontend does with one request's tokens (set at admission)."""

    stop: list[str]
    #: stop strings are matched once the output holds this many tokens
    min_new_tokens: int = 0
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_interval: int = 1
    return_logprob: bool = False
    top_logprobs_num: int = 0
    prompt_logprobs: bool = False


@dataclass(eq=False)
class RequestState:
    """Everything the frontend tracks for one (sub-)request between send and finish."""

    rid: str
    index: int
    prompt_ids: list[int]
    tokenizer: Tokenizer
    options: RequestOptions
    sink: Sink
    created: float = field(default_factory=time.perf_counter)
    num_output_tokens: int = 0
    usage: Usage = field(default_factory=Usage)
    first_token_time: float | None = None
    last_token_time: float | None = None
    queue_time: float | None = None
    finish: FinishReason | None = None
    started: bool = False  # the scheduler produced something for it: it left the queue
    health_check: bool = False
    _pending: RequestOutput | None = None
    _unflushed_tokens: int = 0

    def __post_init__(self) -> None:
        self.detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.options.stop,
                                            self.options.skip_special_tokens)
        self.usage.prompt_tokens = len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish is not None

    # -- feeding ------------------------------------------------------------------------------

    def on_output(self, step: StepOutput) -> bool:
        """Apply one scheduler delta. Returns True when the request just finished because a
        stop string matched here (the caller must then abort it in the scheduler)."""
        if self.finished:
            return False
        self.started = True
        self.usage.cached_tokens = step.cached_tokens
        pending = self._buffer()
        if step.prompt_logprobs is not None:
            self._add_prompt_logprobs(pending, step)
        if step.embedding is not None:
            pending.embedding = step.embedding
        reason = step.finish
        ids = step.new_token_ids
        if step.queue_time is not None:
            self.queue_time = step.queue_time
        if ids:  # one token per step (StepOutput's contract)
            now = time.perf_counter()
            if self.first_token_time is None:
                self.first_token_time = now
            if self.last_token_time is not None:
                pending.token_gaps.append(now - self.last_token_time)
            self.last_token_time = now
        # a matched stop token is counted but its text is not emitted (SGLang's stop trim)
        trim_last = bool(not self.options.no_stop_trim and reason is not None
                         and reason.kind is FinishKind.STOP and isinstance(reason.matched, int)
                         and ids and ids[-1] == reason.matched)
        stop_hit = False
        for pos, tid in enumerate(ids):
            self.num_output_tokens += 1
            self._unflushed_tokens += 1
            pending.token_ids.append(tid)
            self._add_logprob(pending, step, pos, tid)
            if trim_last and pos == len(ids) - 1:
                break
            pending.text += self.detok.add(
                [tid], check_stop=self.num_output_tokens >= self.options.min_new_tokens)
            if self.detok.stop_matched is not None:
                stop_hit = True
                reason = FinishReason.stop(self.detok.stop_matched)
                if self.options.no_stop_trim:
                    pending.text += self.detok.stop_matched
                break
        self.usage.completion_tokens = self.num_output_tokens
        if reason is not None:
            if not stop_hit:
                pending.text += self.detok.finish()
            self.finish_with(reason)
            return stop_hit
        if self.options.stream and (self._unflushed_tokens >= self.options.stream_interval
                                    or step.prompt_logprobs is not None):
            self._flush()
        return False

    def _buffer(self) -> RequestOutput:
        if self._pending is None:
            self._pending = RequestOutput(rid=self.rid, index=self.index,
                                          logprobs=[] if self.options.return_logprob else None)
        return self._pending

    def _add_logprob(self, pending: RequestOutput, step: StepOutput, pos: int, tid: int) -> None:
        if pending.logprobs is None:
            return
        lps, tops = step.logprobs or [], step.top_logprobs or []
        value = lps[pos] if pos < len(lps) else None
        top = tops[pos] if pos < len(tops) else []
        pending.logprobs.append(self._entry(tid, value, top))

    def _add_prompt_logprobs(self, pending: RequestOutput, step: StepOutput) -> None:
        assert step.prompt_logprobs is not None
        if pending.prompt_logprobs is None:
            pending.prompt_logprobs = []
            pending.prompt_logprobs_start = step.prompt_logprobs_start
        tops = step.prompt_top_logprobs or []
        for i, value in enumerate(step.prompt_logprobs):
            pos = step.prompt_logprobs_start + i
            top = tops[i] if i < len(tops) else []
            pending.prompt_logprobs.append(self._entry(self.prompt_ids[pos], value, top))

    def _entry(self, tid: int, value: float | None, top: list[TopEntry]) -> TokenLogprob:
        text = self.tokenizer.id_to_text
        alts = tuple((i, v, text(i)) for i, v in top[:self.options.top_logprobs_num])
        return TokenLogprob(tid, value, text(tid), alts)

    def _flush(self) -> None:
        out, self._pending = self._pending, None
        self._unflushed_tokens = 0
        if out is None:
            return
        out.usage = Usage(self.usage.prompt_tokens, self.usage.completion_tokens,
                          self.usage.cached_tokens)
        if out.finish is not None:
            now = time.perf_counter()
            out.e2e_latency = now - self.created
            out.queue_time = self.queue_time
            if self.first_token_time is not None:
                out.ttft = self.first_token_time - self.created
        self.sink(out)

    def finish_with(self, reason: FinishReason) -> None:
        """Finish now with ``reason`` and emit the last output (no-op when finished)."""
        if self.finished:
            return
        self.finish = reason
        self._buffer().finish = reason
        self._flush()
