"""What a caller receives for a request: typed deltas, one :class:`RequestOutput` at a time.

Each output holds only what is new since the previous output of the same choice: the text
and token ids generated since then, their logprobs, prompt logprobs computed since then, and
on the last output the :class:`FinishReason` and final usage. Concatenating a choice's outputs
gives the whole result; nothing is sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from heteroserve.core.scheduler.outputs import FinishKind, FinishReason

__all__ = ["FinishKind", "FinishReason", "RequestOutput", "TokenLogprob", "Usage"]


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token, its logprob (``None`` for the first prompt token, which has no
    context) and its text decoded alone; ``top`` are the best alternatives as
    ``(token id, logprob, text)``, best first (empty unless asked for)."""

    token_id: int
    logprob: float | None
    text: str
    top: tuple[tuple[int, float, str], ...] = ()


@dataclass
class Usage:
    """Token counts of one choice so far (prompt counted per choice; callers that sum over
    choices count the prompt once)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class RequestOutput:
    """A delta of one choice (``index`` in ``0..n-1``) of request ``rid``.

    ``text`` / ``token_ids``: generated since this choice's previous output (text is held
    back while it could still become a stop string or ends inside a UTF-8 character).
    ``logprobs``: parallel to ``token_ids`` when logprobs were asked for, else ``None``.
    ``prompt_logprobs``: prompt positions ``prompt_logprobs_start..`` computed since the
    previous output (``None`` when not asked for or none new). ``finish`` is set on the last
    output only; ``ttft`` / ``e2e_latency`` (seconds since the request was registered) are set
    on the last output too, and so is ``queue_time``: seconds the request waited in the
    scheduler's queue before it was first scheduled (``None`` if it never was).
    ``token_gaps``: for each token of this delta that follows an earlier one, the seconds
    since that earlier token arrived (the inter-token latency as the frontend sees it).
    ``embedding``: an embedding request's pooled vector, on its last (only) output.
    """

    rid: str
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs_start: int = 0
    finish: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    ttft: float | None = None
    e2e_latency: float | None = None
    embedding: list[float] | None = None
    queue_time: float | None = None
    token_gaps: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish is not None
