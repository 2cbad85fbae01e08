"""Pydantic models of the HTTP API: OpenAI requests and responses, and SGLang's ``/generate``.

Requests accept unknown fields (clients send many; each is logged once per request and
ignored). These models check types and the OpenAI-only fields (``logprobs``, ``top_logprobs``,
``max_tokens``); sampling values are checked once, at admission, by
``SamplingParams.validate`` (a 400 naming the field either way).
Responses are built with these models and serialised with ``model_dump(exclude_none=True)``
except where OpenAI fixes a ``null`` (``logprobs``, ``finish_reason`` in stream chunks).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        """Names of fields in the request that this server does not know (they are ignored)."""
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a final chunk with ``usage`` and no choices."""

    include_usage: bool = False


class ResponseFormat(BaseModel):
    """``response_format``: ``text``, ``json_object`` or ``json_schema`` (with ``json_schema``
    ``{"name", "schema", "strict"}``)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (its ``StructuredOutputsParams``; the ``guided_*`` fields'
    successor): at most one of ``json`` (a schema), ``regex``, ``choice``, ``grammar``
    (EBNF), ``json_object``. ``disable_fallback`` and ``disable_any_whitespace`` are accepted
    (there is one backend, and JSON is generated without free whitespace);
    ``disable_additional_properties``, ``whitespace_pattern`` and ``structural_tag`` are not
    supported (a 400). Unknown keys are a 400."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None


class SamplingFields(_Request):
    """Sampling fields shared by completions and chat (OpenAI's, then SGLang/vLLM extensions),
    plus the structured-output fields read by :mod:`heteroserve.server.structured`."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (SGLang / vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    include_stop_str_in_output: bool | None = None  # vLLM's spelling of no_stop_trim
    rid: str | None = None
    # vLLM's prompt handling: keep the prompt's last N tokens (-1: as many as fit with
    # max_tokens); add the tokenizer's special tokens (default: true for a completion's text
    # prompt, false for chat, whose template writes them)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    add_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    # vLLM fields with no counterpart here: a 400 when set to anything but their defaults
    use_beam_search: bool | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    # structured outputs (see structured.py)
    response_format: ResponseFormat | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, a list of token ids
    or a list of token-id lists (one choice group per prompt). ``logprobs``: how many top
    alternatives per token (0 = only the sampled token's logprob)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ContentPart(BaseModel):
    """One part of a multi-part message content; only ``text`` parts are supported."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message. ``content`` is text or a list of text parts (``None`` for an
    assistant message that only calls tools)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    """A tool's function: ``name`` (letters, digits, ``_``, ``-``, ``.``; at most 64),
    ``description``, ``parameters`` (a JSON schema of an object; none: no arguments)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    """One entry of ``tools`` (only ``function`` tools exist)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function: ``{"type": "function", "function": {"name"}}``."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``;
    without either, generation may run to the end of the context window. ``logprobs`` asks for
    the sampled tokens' logprobs, ``top_logprobs`` for that many alternatives each."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    separate_reasoning: bool = True
    # vLLM's: render without the assistant header, or continue the final (assistant) message
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class GenerateReqInput(_Request):
    """SGLang's native ``POST /generate``: ``text`` or ``input_ids`` (one prompt or a batch),
    ``sampling_params`` (a dict, or one per prompt) with SGLang's names."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    logprob_start_len: int | None = None


class AbortReqInput(BaseModel):
    """SGLang's ``POST /abort_request``: abort request ``rid``."""

    rid: str


# -- responses -----------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one response (prompt tokens counted once per prompt, not per choice)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions logprobs object; lists run parallel over generated tokens."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class _Choice(BaseModel):
    """Fields every choice shares, in full replies and in stream chunks."""

    index: int
    finish_reason: str | None = None
    matched_stop: int | str | None = None


class _Reply(BaseModel):
    """Fields every reply and stream chunk shares."""

    id: str
    created: int = Field(default_factory=_now)
    model: str
    usage: Usage | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed piece of tool call ``index``: the first carries ``id``, ``type`` and the
    function name, later ones argument text to append."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatChoice(_Choice):
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_Choice):
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]


#: a streamed completion chunk has the shape of a full completion reply
CompletionChunk = CompletionResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "heteroserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error reply."""

    error: ErrorDetail
