"""Engine logprob entries -> OpenAI's two logprob shapes.

The engine gives, per generated token, ``(logprob, token_id, token_text)`` in
``meta_info["output_token_logprobs"]`` and a best-first list of such triples in
``meta_info["output_top_logprobs"]`` (cumulative over the request). Both functions format a
slice ``[start:]`` so that streaming replies send each token once.
"""

from __future__ import annotations

import math
from typing import Any

from heteroserve.server.protocol import (
    ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob,
)

Entry = tuple[float | None, int, str]


def _entries(meta: dict[str, Any], start: int) -> tuple[list[Entry], list[list[Entry]] | None]:
    tokens = list(meta.get("output_token_logprobs") or [])[start:]
    top = meta.get("output_top_logprobs")
    return tokens, None if top is None else list(top)[start:]


def _lp(value: Any) -> float | None:
    """A JSON-safe logprob: ``-inf`` (a token that cannot be sampled) becomes ``-9999.0``."""
    if value is None or math.isnan(float(value)):
        return None
    return max(float(value), -9999.0)


def count(meta: dict[str, Any]) -> int:
    """How many generated tokens have logprob entries so far."""
    return len(meta.get("output_token_logprobs") or [])


def completion_logprobs(meta: dict[str, Any], start: int, text_offset: int,
                        with_top: bool) -> tuple[CompletionLogprobs, int]:
    """The legacy completions object for tokens ``[start:]`` and the text offset after them.

    ``text_offset`` is where the first of these tokens starts in the choice's text (after an
    echoed prompt); ``with_top`` adds ``top_logprobs`` dicts (token text -> logprob).
    """
    tokens, top = _entries(meta, start)
    out = CompletionLogprobs(top_logprobs=[] if with_top else None)
    offset = text_offset
    for pos, (lp, _tid, text) in enumerate(tokens):
        out.tokens.append(text)
        out.token_logprobs.append(_lp(lp))
        out.text_offset.append(offset)
        offset += len(text)
        if with_top and out.top_logprobs is not None:
            alts = top[pos] if top is not None and pos < len(top) else []
            out.top_logprobs.append(_by_text(alts))
    return out, offset


def _by_text(alts: list[Entry]) -> dict[str, float]:
    """Legacy ``top_logprobs`` are keyed by token text; distinct tokens can decode to the same
    text (partial UTF-8 bytes all read as U+FFFD), and the best of them is kept."""
    best: dict[str, float] = {}
    for value, _tid, text in alts:
        lp = _lp(value)
        if lp is not None and lp > best.get(text, -math.inf):
            best[text] = lp
    return best


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(meta: dict[str, Any], start: int) -> ChatLogprobs:
    """The chat ``logprobs`` object (``content`` entries) for tokens ``[start:]``."""
    tokens, top = _entries(meta, start)
    content = []
    for pos, (lp, _tid, text) in enumerate(tokens):
        alts = top[pos] if top is not None and pos < len(top) else []
        content.append(TokenLogprob(
            token=text, logprob=_lp(lp), bytes=_bytes(text),
            top_logprobs=[TopLogprob(token=t, logprob=_lp(v), bytes=_bytes(t))
                          for v, _i, t in alts]))
    return ChatLogprobs(content=content)
