"""What every route needs, built once per app: the engine client, the served model name,
metrics, the reasoning and tool-call parsers, and the small helpers shared by the OpenAI routes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from heteroserve.core.config import ServerArgs
from heteroserve.core.runtime.outputs import FinishKind, FinishReason
from heteroserve.core.runtime.outputs import Usage as EngineUsage
from heteroserve.server.errors import APIError
from heteroserve.server.metrics import ServerMetrics
from heteroserve.server.protocol import PromptTokensDetails, Usage
from heteroserve.server.tool_calls.base import ToolCallParser


@dataclass
class ServerContext:
    """Per-app state. ``client`` is an ``EngineClient`` (or anything with its interface);
    ``model_name`` is the name ``model`` fields carry (``None`` and ``""`` mean it);
    ``model_aliases`` are other names accepted for it."""

    client: Any
    server_args: ServerArgs
    model_name: str
    metrics: ServerMetrics
    reasoning_parser: Any = None
    tool_parser: ToolCallParser | None = None
    model_aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    @property
    def context_len(self) -> int:
        return int(self.client.info.max_context_len)

    def check_model(self, model: str | None) -> None:
        """Raise a 404 ``model_not_found`` unless ``model`` names the served model."""
        if model and model != self.model_name and model not in self.model_aliases:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")


def get_context(request: Request) -> ServerContext:
    """FastAPI dependency: the app's :class:`ServerContext`."""
    return request.app.state.ctx


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-<32 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def sub_rid(rid: str, prompt_index: int, num_prompts: int) -> str:
    """The engine request id of prompt ``prompt_index`` of a response with id ``rid``."""
    return rid if num_prompts == 1 else f"{rid}-p{prompt_index}"


def finish_reason(reason: FinishReason | None) -> tuple[str | None, int | str | None]:
    """OpenAI's ``finish_reason`` (``stop``, ``length``, ``abort``) and the matched stop
    token id or string."""
    if reason is None:
        return None, None
    return reason.kind.value, reason.matched if reason.kind is FinishKind.STOP else None


def usage(choices_per_prompt: list[list[EngineUsage | None]]) -> Usage:
    """Usage of a response from each choice's final usage, per prompt: each prompt's tokens
    once, every choice's completion tokens."""
    prompt = completion = cached = 0
    for choices in choices_per_prompt:
        known = [u for u in choices if u is not None]
        if known:
            prompt += known[0].prompt_tokens
            cached += known[0].cached_tokens
        completion += sum(u.completion_tokens for u in known)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def openai_json(model: Any) -> dict[str, Any]:
    """A response or stream chunk as a dict: ``None`` fields dropped except each choice's
    ``finish_reason`` and ``logprobs``, which OpenAI always sends (``null`` when unset)."""
    data = model.model_dump(exclude_none=True)
    for raw, choice in zip(model.choices, data.get("choices", [])):
        choice["finish_reason"] = raw.finish_reason
        choice.setdefault("logprobs", None)
    return data
