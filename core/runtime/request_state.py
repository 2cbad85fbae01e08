"""Frontend-side state of one (sub-)request: detokenization, stop strings, logprobs, and the
SGLang-shaped dicts handed to the caller.

A :class:`RequestState` is fed the scheduler's :class:`StepOutput` objects for its rid and
emits items through its ``sink``:
``("chunk", index, dict)`` while streaming, ``("final", index, dict)`` once, or
``("error", index, exception)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from heteroserve.core.scheduler.request import StepOutput
from heteroserve.core.tokenizer import IncrementalDetokenizer, Tokenizer

Sink = Callable[[tuple[str, int, Any]], None]


@dataclass
class RequestState:
    """Everything the frontend tracks for one (sub-)request between send and finish."""

    rid: str
    index: int
    prompt_ids: list[int]
    tokenizer: Tokenizer
    stop: list[str]
    skip_special_tokens: bool
    stream: bool
    stream_interval: int
    return_logprob: bool
    top_logprobs_num: int
    sink: Sink
    no_stop_trim: bool = False
    created: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, int, str]] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int, str]]] = field(default_factory=list)
    cached_tokens: int = 0
    first_token_time: float | None = None
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    on_first_output: Callable[[], None] | None = None
    _streamed_len: int = 0

    def __post_init__(self) -> None:
        self.detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids, self.stop,
                                            self.skip_special_tokens)

    # -- feeding ------------------------------------------------------------------------------

    def on_output(self, view: StepOutput) -> bool:
        """Apply one scheduler output. Returns True when the request just finished because a
        stop string matched here (the caller must then abort it in the scheduler)."""
        if self.finished:
            return False
        if self.on_first_output is not None:
            callback, self.on_first_output = self.on_first_output, None
            callback()
        self.cached_tokens = int(view.cached_tokens)
        if view.new_token_ids and self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        reason = view.finish_reason
        ids = view.new_token_ids
        # a matched stop token is counted but its text is not emitted (SGLang's stop trim)
        trim_last = bool(not self.no_stop_trim and reason and reason.get("type") == "stop"
                         and isinstance(reason.get("matched"), int) and ids
                         and ids[-1] == reason["matched"])
        stop_hit = False
        for pos, tid in enumerate(ids):
            self.output_ids.append(tid)
            self._record_logprobs(view, pos, tid)
            if trim_last and pos == len(ids) - 1:
                break
            self.detok.add([tid])
            if self.detok.stop_matched is not None:
                stop_hit = True
                reason = {"type": "stop", "matched": self.detok.stop_matched}
                if self.no_stop_trim:
                    self.detok.text += self.detok.stop_matched
                break
        if reason is not None:
            if not stop_hit:
                self.detok.finish()
            self.finish(reason)
            return stop_hit
        if self.stream and len(self.output_ids) - self._streamed_len >= self.stream_interval:
            self._streamed_len = len(self.output_ids)
            self.sink(("chunk", self.index, self.to_dict()))
        return False

    def _record_logprobs(self, view: StepOutput, pos: int, tid: int) -> None:
        if not self.return_logprob:
            return
        lps, tops = view.logprobs or [], view.top_logprobs or []
        lp = lps[pos] if pos < len(lps) else None
        self.token_logprobs.append((lp, tid, self.tokenizer.id_to_text(tid)))
        if self.top_logprobs_num > 0:
            top = tops[pos] if pos < len(tops) else []
            self.top_logprobs.append([(v, i, self.tokenizer.id_to_text(i))
                                      for i, v in top[:self.top_logprobs_num]])

    def finish(self, reason: dict[str, Any]) -> None:
        """Finish now with ``reason`` and emit the final dict (no-op when already finished)."""
        if self.finished:
            return
        self.finished = True
        self.finish_reason = reason
        self.sink(("final", self.index, self.to_dict()))

    def fail(self, exc: BaseException) -> None:
        """Finish with an error raised in the caller's iterator."""
        if self.finished:
            return
        self.finished = True
        self.sink(("error", self.index, exc))

    # -- output ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The SGLang-shaped output so far (cumulative text, ids and logprobs)."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "e2e_latency": time.perf_counter() - self.created,
        }
        if self.first_token_time is not None:
            meta["ttft"] = self.first_token_time - self.created
        if self.return_logprob:
            meta["output_token_logprobs"] = list(self.token_logprobs)
            if self.top_logprobs_num > 0:
                meta["output_top_logprobs"] = list(self.top_logprobs)
        return {"text": self.detok.text, "output_ids": list(self.output_ids),
                "meta_info": meta, "index": self.index}
