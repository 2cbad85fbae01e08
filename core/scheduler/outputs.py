"""What the scheduler hands back per step: typed per-request deltas.

A :class:`StepOutput` carries only what one step added for one request (new token ids, their
logprobs, newly computed prompt logprobs) and, on its last output, a :class:`FinishReason`.
Nothing here is cumulative: consumers accumulate if they need to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


SHUTDOWN_CODE = "server_shutting_down"


class FinishKind(str, enum.Enum):
    """Why a request ended. The values are the OpenAI / SGLang ``finish_reason`` strings."""

    STOP = "stop"        # EOS, a stop token, a stop string or a terminated grammar
    LENGTH = "length"    # max_new_tokens or the context window
    ABORT = "abort"      # the caller aborted it (disconnect, abort call, shutdown)
    ERROR = "error"      # this request failed inside the engine; the engine goes on


@dataclass(frozen=True)
class FinishReason:
    """A typed finish reason. ``matched``: the stop token id or stop string for ``STOP``;
    ``message``: a one-line explanation for ``ABORT`` / ``ERROR``; ``length``: the token
    count for ``LENGTH``; ``code``: a machine-readable cause for ``ERROR``
    (:data:`SHUTDOWN_CODE` when the server ended the request because it is stopping)."""

    kind: FinishKind
    matched: int | str | None = None
    message: str | None = None
    length: int | None = None
    code: str | None = None

    @classmethod
    def stop(cls, matched: int | str | None) -> FinishReason:
        return cls(FinishKind.STOP, matched=matched)

    @classmethod
    def of_length(cls, length: int) -> FinishReason:
        return cls(FinishKind.LENGTH, length=length)

    @classmethod
    def abort(cls, message: str = "aborted") -> FinishReason:
        return cls(FinishKind.ABORT, message=message)

    @classmethod
    def error(cls, message: str, code: str | None = None) -> FinishReason:
        return cls(FinishKind.ERROR, message=message, code=code)

    def to_sglang(self) -> dict[str, Any]:
        """SGLang's ``meta_info["finish_reason"]`` dict (``{"type": ..., ...}``)."""
        out: dict[str, Any] = {"type": self.kind.value}
        if self.kind is FinishKind.STOP:
            out["matched"] = self.matched
        elif self.kind is FinishKind.LENGTH:
            out["length"] = self.length
        else:
            out["message"] = self.message
        return out


#: one top-logprob alternative: (token id, logprob)
TopEntry = tuple[int, float]


@dataclass
class StepOutput:
    """What one step produced for one request.

    ``new_token_ids``: tokens sampled this step (0 or 1, more never); ``logprobs`` /
    ``top_logprobs`` run parallel to them when the request asked for logprobs.
    ``prompt_logprobs``: logprobs of prompt tokens computed this step, in prompt order
    starting at prompt position ``prompt_logprobs_start`` (``None`` for a position that has
    no logprob, i.e. position 0); ``prompt_top_logprobs`` parallel to it.
    ``finish``: set on the request's last output. Counts are totals so far;
    ``queue_time``: seconds the request waited in the scheduler's queue before it was first
    scheduled (``None`` while it has not been).
    ``embedding``: an embedding request's pooled vector (fp32 values as floats), on its
    last output only.
    """

    rid: str
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[TopEntry]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[TopEntry]] | None = None
    prompt_logprobs_start: int = 0
    finish: FinishReason | None = None
    cached_tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding: list[float] | None = None
    queue_time: float | None = None
