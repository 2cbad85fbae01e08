"""SGLang's cumulative output dicts, built from :class:`RequestOutput` deltas.

Only the offline ``Engine`` and native ``/generate`` return this shape (it is SGLang's API);
everything else passes the deltas on. One :class:`SGLangAccumulator` per choice.
"""

from __future__ import annotations

from typing import Any

from heteroserve.core.runtime.outputs import RequestOutput, TokenLogprob

Entry = tuple[float | None, int, str]


def _entry(lp: TokenLogprob) -> Entry:
    return (lp.logprob, lp.token_id, lp.text)


def _tops(lp: TokenLogprob) -> list[Entry]:
    return [(v, i, t) for i, v, t in lp.top]


class SGLangAccumulator:
    """Folds one choice's deltas into SGLang's dict: ``text``, ``output_ids``, ``index`` and
    ``meta_info`` (``id``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``,
    ``cached_tokens``, ``e2e_latency``, ``ttft``, and with logprobs
    ``output_token_logprobs`` / ``output_top_logprobs`` / ``input_token_logprobs`` /
    ``input_top_logprobs`` as ``(logprob, token id, text)`` triples)."""

    def __init__(self, rid: str, index: int, top_logprobs: bool) -> None:
        self.rid, self.index, self.top = rid, index, top_logprobs
        self.text = ""
        self.output_ids: list[int] = []
        self.token_logprobs: list[Entry] | None = None
        self.top_logprobs: list[list[Entry]] = []
        self.input_logprobs: list[Entry] | None = None
        self.input_top_logprobs: list[list[Entry]] = []
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> dict[str, Any]:
        """Fold ``out`` in and return the cumulative dict so far."""
        self.text += out.text
        self.output_ids += out.token_ids
        if out.logprobs is not None:
            if self.token_logprobs is None:
                self.token_logprobs = []
            self.token_logprobs.extend(_entry(e) for e in out.logprobs)
            self.top_logprobs.extend(_tops(e) for e in out.logprobs)
        if out.prompt_logprobs is not None:
            if self.input_logprobs is None:
                self.input_logprobs = []
            self.input_logprobs.extend(_entry(e) for e in out.prompt_logprobs)
            self.input_top_logprobs.extend(_tops(e) for e in out.prompt_logprobs)
        self.last = out
        return self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        out = self.last
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": out.finish.to_sglang() if out and out.finish else None,
            "prompt_tokens": out.usage.prompt_tokens if out else 0,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": out.usage.cached_tokens if out else 0,
        }
        if out is not None and out.e2e_latency is not None:
            meta["e2e_latency"] = out.e2e_latency
        if out is not None and out.ttft is not None:
            meta["ttft"] = out.ttft
        if self.token_logprobs is not None:
            meta["output_token_logprobs"] = list(self.token_logprobs)
            if self.top:
                meta["output_top_logprobs"] = list(self.top_logprobs)
        if self.input_logprobs is not None:
            meta["input_token_logprobs"] = list(self.input_logprobs)
            if self.top:
                meta["input_top_logprobs"] = list(self.input_top_logprobs)
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta,
                "index": self.index}
