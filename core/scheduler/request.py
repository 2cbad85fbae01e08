"""One request's state inside the scheduler."""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, field
from typing import Any

from heteroserve.core.model_runner.pooling import EmbedSpec, PoolAccumulator, PoolingType
from heteroserve.core.scheduler.outputs import FinishReason
from heteroserve.core.scheduler.sampling_params import SamplingParams


class ReqState(str, enum.Enum):
    WAITING = "waiting"      # queued (new, or retracted and requeued)
    RUNNING = "running"      # holds KV; prefilling in chunks, then decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Req:
    """State machine: WAITING -> RUNNING (prefill chunks until ``kv_len`` covers every token
    but the last generated one, then decode) -> FINISHED; a retraction sends a RUNNING
    request back to WAITING with its KV released and its outputs kept.

    ``fill_ids`` (prompt + outputs) is what must be in the KV cache for the next step;
    ``kv_len`` tokens of it already are. ``pages`` covers ``kv_len`` (prefix pages come from
    the radix cache and are locked through ``cache_node``).

    ``queue_time``: seconds from :meth:`Scheduler.add_request` to the first step that
    scheduled it (a retraction does not reset it).

    Prompt logprobs (``logprob_start_len >= 0``): ``prompt_logprob_next`` is the next prompt
    position whose logprob is still to be reported; prefix-cache matches stop short of it so
    that the logits it needs are computed.

    Embedding requests (``embed`` set, ``max_new_tokens == 0``) pool their prompt's final
    hidden states into ``pool`` while they prefill and finish when the prompt is done; mean
    pooling never reuses cached KV (every token's hidden state is needed).
    """

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    output_ids: list[int] = field(default_factory=list)
    state: ReqState = ReqState.WAITING
    kv_len: int = 0
    pages: list[int] = field(default_factory=list)
    num_prefix_pages: int = 0
    cache_node: Any = None
    cached_tokens: int = 0
    prefilled: bool = False
    seed: int = 0
    grammar: Any = None
    finish: FinishReason | None = None
    arrival: int = 0
    prompt_logprob_next: int = 0
    embed: EmbedSpec | None = None
    pool: PoolAccumulator | None = None
    queued_at: float = 0.0  # time.monotonic() when it was queued
    queue_time: float | None = None  # seconds from queued to first scheduled (None: not yet)

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise ValueError("empty prompt")
        self.prompt_logprob_next = max(self.logprob_start_len, 0)
        if self.embed is not None:
            if self.sampling_params.max_new_tokens != 0:
                raise ValueError("an embedding request generates no tokens (max_new_tokens 0)")
            self.pool = PoolAccumulator(self.embed)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while prompt positions from ``logprob_start_len`` on remain to report."""
        return self.logprob_start_len >= 0 and self.prompt_logprob_next < len(self.input_ids)

    @property
    def max_cached_prefix(self) -> int:
        """How many leading tokens may come from the prefix cache: all but the last, and
        none at or after the position whose logits the next prompt logprob needs."""
        limit = len(self.fill_ids) - 1
        if self.embed is not None and not self.embed.reuses_prefix:
            return 0
        if self.wants_prompt_logprobs:
            limit = min(limit, max(self.prompt_logprob_next - 1, 0))
        return limit

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def pending_len(self) -> int:
        """Tokens whose KV the next step must compute."""
        return len(self.input_ids) + len(self.output_ids) - self.kv_len

    def pooling_upto(self, upto: int) -> PoolingType | None:
        """What this request's step computing tokens up to ``upto`` pools: mean pooling takes
        every chunk, last-token pooling only the chunk that ends the prompt."""
        if self.embed is None:
            return None
        if self.embed.pooling is PoolingType.LAST and upto < len(self.fill_ids):
            return None
        return self.embed.pooling

    def derive_seed(self, engine_seed: int) -> None:
        sp_seed = self.sampling_params.seed
        self.seed = sp_seed if sp_seed is not None else zlib.crc32(
            f"{engine_seed}:{self.rid}".encode()) & 0x7FFFFFFF
