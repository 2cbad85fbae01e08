"""``/tokenize`` and ``/detokenize`` (also under ``/v1``), in vLLM's shapes, which SGLang's
clients read too.

``POST /tokenize`` takes ``prompt`` (text, tokenized with ``add_special_tokens``, default
true; a list of texts gives a list per text) or ``messages`` (rendered with the served chat
template, as ``/v1/chat/completions`` renders them) and answers ``{"tokens", "count",
"max_model_len"}`` (plus ``token_strs`` with ``return_token_strs``). ``POST /detokenize``
takes ``tokens`` and answers ``{"prompt", "text"}`` (vLLM's and SGLang's names for the same
text). Tokenizing runs in the engine's admission pool, never on the event loop; bad input
is a 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from heteroserve.core.runtime.errors import RequestError
from heteroserve.server.auth import require_api_key
from heteroserve.server.chat import chat_prompt_ids
from heteroserve.server.tool_calls.plan import plan_tools
from heteroserve.server.context import ServerContext, get_context
from heteroserve.server.errors import bad_request, engine_error
from heteroserve.server.json_body import OffLoopJSONRoute
from heteroserve.server.protocol import ChatCompletionRequest, ChatMessage, ErrorResponse

#: the most texts one ``/tokenize`` call takes
MAX_TOKENIZE_PROMPTS = 1024

tokenize_router = APIRouter(tags=["tokenizer"], dependencies=[Depends(require_api_key)],
                            responses={s: {"model": ErrorResponse} for s in (400, 401, 404)},
                            route_class=OffLoopJSONRoute)


class TokenizeRequest(BaseModel):
    """vLLM's completion form (``prompt``) or chat form (``messages``); exactly one."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    """``tokens`` / ``count`` (a list of each for a list of prompts); ``max_model_len``: the
    context window; ``token_strs``: each token as text, when asked."""

    tokens: list[int] | list[list[int]]
    count: int | list[int]
    max_model_len: int
    token_strs: list[str] | list[list[str]] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
    skip_special_tokens: bool = False


class DetokenizeResponse(BaseModel):
    prompt: str
    text: str


async def _ids(ctx: ServerContext, req: TokenizeRequest) -> list[list[int]] | list[int]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if req.messages is not None:
        chat = ChatCompletionRequest(model=req.model, messages=req.messages, tools=req.tools,
                                     chat_template_kwargs=req.chat_template_kwargs,
                                     add_generation_prompt=req.add_generation_prompt,
                                     continue_final_message=req.continue_final_message,
                                     add_special_tokens=req.add_special_tokens)
        plan = plan_tools(chat, ctx.tool_parser, ctx.server_args.grammar_max_bytes)
        return await chat_prompt_ids(ctx, chat, plan.template_tools)
    special = True if req.add_special_tokens is None else req.add_special_tokens
    texts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
    if not texts or len(texts) > MAX_TOKENIZE_PROMPTS:
        raise bad_request(f"prompt must hold 1 to {MAX_TOKENIZE_PROMPTS} texts", "prompt")
    try:
        out = [await ctx.client.admission.tokenize(t, special) for t in texts]
    except RequestError as exc:
        raise engine_error(exc) from None
    return out if isinstance(req.prompt, list) else out[0]


@tokenize_router.post("/tokenize", response_model=TokenizeResponse,
                      response_model_exclude_none=True)
@tokenize_router.post("/v1/tokenize", response_model=TokenizeResponse,
                      response_model_exclude_none=True, include_in_schema=False)
async def tokenize(req: TokenizeRequest, ctx: ServerContext = Depends(get_context)
                   ) -> TokenizeResponse:
    """Token ids of a prompt or of chat messages (see the module docstring)."""
    ctx.check_model(req.model)
    ids = await _ids(ctx, req)
    nested = isinstance(req.prompt, list)
    rows: list[list[int]] = ids if nested else [ids]  # type: ignore[assignment,list-item]
    strs = None
    if req.return_token_strs:
        tok = ctx.tokenizer.hf
        strs = [list(tok.convert_ids_to_tokens(r)) for r in rows]
    counts = [len(r) for r in rows]
    return TokenizeResponse(tokens=rows if nested else rows[0],
                            count=counts if nested else counts[0],
                            max_model_len=ctx.context_len,
                            token_strs=None if strs is None else strs if nested else strs[0])


@tokenize_router.post("/detokenize", response_model=DetokenizeResponse)
@tokenize_router.post("/v1/detokenize", response_model=DetokenizeResponse,
                      include_in_schema=False)
async def detokenize(req: DetokenizeRequest, ctx: ServerContext = Depends(get_context)
                     ) -> DetokenizeResponse:
    """The text of token ids (special tokens kept unless ``skip_special_tokens``)."""
    ctx.check_model(req.model)
    try:
        text = await ctx.client.admission.detokenize(req.tokens, req.skip_special_tokens)
    except RequestError as exc:
        raise engine_error(exc) from None
    return DetokenizeResponse(prompt=text, text=text)
