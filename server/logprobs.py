"""The engine's :class:`TokenLogprob` deltas -> OpenAI's two logprob shapes.

Both functions format just the entries they are given (one output's delta), so streamed
replies send each token once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from heteroserve.core.runtime.outputs import TokenLogprob
from heteroserve.server.protocol import (
    ChatLogprobs, CompletionLogprobs, TokenLogprob as ChatTokenLogprob, TopLogprob,
)


def _lp(value: float | None) -> float | None:
    """A JSON-safe logprob: ``-inf`` (a token that cannot be sampled) becomes ``-9999.0``."""
    if value is None or math.isnan(float(value)):
        return None
    return max(float(value), -9999.0)


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int,
                        with_top: bool) -> tuple[CompletionLogprobs, int]:
    """The legacy completions object for ``entries`` and the text offset after them.

    ``text_offset`` is where the first entry's text starts in the choice's text;
    ``with_top`` adds ``top_logprobs`` dicts (token text -> logprob; ``None`` for a position
    with no logprob, the first prompt token)."""
    out = CompletionLogprobs(top_logprobs=[] if with_top else None)
    offset = text_offset
    for entry in entries:
        out.tokens.append(entry.text)
        out.token_logprobs.append(_lp(entry.logprob))
        out.text_offset.append(offset)
        offset += len(entry.text)
        if with_top and out.top_logprobs is not None:
            out.top_logprobs.append(None if entry.logprob is None else _by_text(entry))
    return out, offset


def merge_completion_logprobs(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    """One object from consecutive pieces (prompt entries, then generated ones)."""
    merged = CompletionLogprobs(top_logprobs=None if all(p.top_logprobs is None for p in parts)
                                else [])
    for part in parts:
        merged.tokens += part.tokens
        merged.token_logprobs += part.token_logprobs
        merged.text_offset += part.text_offset
        if merged.top_logprobs is not None:
            merged.top_logprobs += part.top_logprobs or []
    return merged


def _by_text(entry: TokenLogprob) -> dict[str, float]:
    """Legacy ``top_logprobs`` are keyed by token text; distinct tokens can decode to the same
    text (partial UTF-8 bytes all read as U+FFFD), and the best of them is kept."""
    best: dict[str, float] = {}
    for _tid, value, text in entry.top:
        lp = _lp(value)
        if lp is not None and lp > best.get(text, -math.inf):
            best[text] = lp
    return best


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    """The chat ``logprobs`` object (``content`` entries) for ``entries``."""
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.text, logprob=_lp(e.logprob), bytes=_bytes(e.text),
                         top_logprobs=[TopLogprob(token=t, logprob=_lp(v), bytes=_bytes(t))
                                       for _i, v, t in e.top])
        for e in entries])
