"""Messages between the caller, the frontend client and the scheduler process.

Everything that crosses the process boundary is a small picklable dataclass; token ids are
plain ``list[int]``. Per-request results flow one way as deltas: the scheduler's
:class:`~heteroserve.core.scheduler.outputs.StepOutput` objects in an :class:`OutputBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from heteroserve.core.model_runner.pooling import EmbedSpec
from heteroserve.core.scheduler.outputs import StepOutput
from heteroserve.core.scheduler.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    """One generation request as the caller states it (before admission).

    Exactly one of ``text`` / ``input_ids`` is set. ``sampling_params``: a typed
    :class:`SamplingParams` (the OpenAI routes build one), or SGLang's dict form (the offline
    API and native ``/generate``; its ``n`` key is read there). ``n``: choices for the typed
    form. ``rid`` defaults to a fresh uuid. ``stream``: emit outputs as tokens arrive (every
    ``--stream-interval`` tokens), else one output per choice. ``return_logprob`` adds
    per-token logprobs; ``top_logprobs_num`` > 0 adds that many alternatives per position;
    ``logprob_start_len`` >= 0 asks for prompt logprobs from that prompt position on.
    ``health_check`` marks the engine's own liveness probe (never set from a client field).
    ``embed``: an embedding request (prefill only, ``n`` 1, no logprobs): its one output
    carries the pooled prompt embedding instead of generated tokens. ``add_special_tokens``:
    whether ``text`` is tokenized with the tokenizer's special tokens (BOS...).
    ``truncate_prompt_tokens`` (vLLM's): keep the prompt's last N tokens (-1: as many as fit
    the context window with ``max_new_tokens``).
    """

    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: SamplingParams | dict[str, Any] = field(default_factory=dict)
    n: int = 1
    rid: str | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    health_check: bool = False
    embed: EmbedSpec | None = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None


@dataclass
class TokenizedRequest:
    """What the frontend sends the scheduler process for one (sub-)request: validated."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    embed: EmbedSpec | None = None


@dataclass
class AbortRequest:
    """Stop ``rid`` and free its KV cache; the scheduler answers with an aborted output or
    nothing if the rid is unknown (already finished)."""

    rid: str


@dataclass
class Hello:
    """The frontend's first message: sent (waiting for the connection) before any request,
    so that requests never find the scheduler's socket unconnected. Ignored there."""


@dataclass
class FlushCacheRequest:
    """Ask the scheduler to empty its radix prefix cache; answered by a
    :class:`FlushCacheResult` with the same ``req_id``."""

    req_id: int


@dataclass
class FlushCacheResult:
    """``flushed``: whether the cache was emptied (it is not while requests run);
    ``freed_pages``: KV pages returned to the pool; ``message``: why not, when not."""

    req_id: int
    flushed: bool
    freed_pages: int = 0
    message: str = ""


@dataclass
class ShutdownRequest:
    """Ask the scheduler process to exit its loop."""


@dataclass
class OutputBatch:
    """One scheduler step's per-request deltas plus a stats snapshot (``None`` otherwise)
    when one is due: with every batch that finishes a request, at least every 0.25 s while
    busy, and once when the scheduler goes idle."""

    outputs: list[StepOutput]
    stats: dict[str, float] | None = None


@dataclass
class RequestFailed:
    """The scheduler rejected one request at admission; the loop keeps running."""

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
    vocab_size: int = 0
    pid: int = 0
    hidden_size: int = 0
