"""Messages between the caller, the frontend client and the scheduler process.

Everything that crosses the process boundary is a small picklable dataclass; token ids are
plain ``list[int]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerateRequest:
    """One generation request as the caller states it.

    Exactly one of ``text`` / ``input_ids`` is set. ``sampling_params`` uses SGLang's names
    (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``stop``,
    ``stop_token_ids``, ``ignore_eos``, ``n``, ``seed``...). ``rid`` defaults to a fresh uuid.
    ``stream``: yield a chunk per decoded piece (else one final dict). ``return_logprob`` adds
    per-token logprobs; ``top_logprobs_num`` > 0 adds that many alternatives per position;
    ``logprob_start_len`` (prompt position, -1 none) asks for prompt logprobs from there where the
    scheduler supports them.
    """

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    rid: str | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


@dataclass
class TokenizedRequest:
    """What the frontend sends the scheduler process for one (sub-)request."""

    rid: str
    input_ids: list[int]
    sampling_params: Any  # heteroserve.core.scheduler.sampling_params.SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1


@dataclass
class AbortRequest:
    """Stop ``rid`` and free its KV cache; the scheduler answers with an aborted output or
    nothing if the rid is unknown (already finished)."""

    rid: str


@dataclass
class ShutdownRequest:
    """Ask the scheduler process to exit its loop."""


@dataclass
class OutputBatch:
    """One scheduler step's outputs (the scheduler's ``StepOutput`` objects) plus a stats
    snapshot (``None`` otherwise) when one is due: with every batch that finishes a request,
    at least every 0.25 s while busy, and once when the scheduler goes idle."""

    outputs: list[Any]
    stats: dict[str, Any] | None = None


@dataclass
class RequestFailed:
    """The scheduler rejected or failed one request; the loop keeps running."""

    rid: str
    message: str


@dataclass
class SchedulerFatal:
    """The scheduler loop died; the message says why. The process exits after sending it."""

    message: str


@dataclass
class ReadyInfo:
    """Sent once when the scheduler process is ready to serve: what it resolved at start-up."""

    platform: str
    device: str
    kernels: list[tuple[str, str, str]]
    max_total_tokens: int
    page_size: int
    max_context_len: int
    max_running_requests: int
    extra: dict[str, Any] = field(default_factory=dict)
