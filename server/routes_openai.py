"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Handlers are thin: the work is in :mod:`~heteroserve.server.completions` and
:mod:`~heteroserve.server.chat`. Errors are OpenAI error objects (see
:mod:`~heteroserve.server.errors`); every route needs the API key when one is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from heteroserve.server.auth import require_api_key
from heteroserve.server.chat import create_chat_completion
from heteroserve.server.completions import create_completion
from heteroserve.server.context import ServerContext, get_context
from heteroserve.server.engine_call import ClientDisconnected
from heteroserve.server.json_body import OffLoopJSONRoute
from heteroserve.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    ErrorResponse, ModelCard, ModelList,
)

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503)}

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)],
                   responses=_ERRORS, route_class=OffLoopJSONRoute)


def _card(ctx: ServerContext, name: str | None = None) -> ModelCard:
    return ModelCard(id=name or ctx.model_name, created=ctx.created,
                     root=ctx.server_args.model_path, max_model_len=ctx.context_len)


@router.get("/models", response_model=ModelList)
async def list_models(ctx: ServerContext = Depends(get_context)) -> ModelList:
    """The one served model: its served name first, then its aliases."""
    return ModelList(data=[_card(ctx, name) for name in (ctx.model_name, *ctx.model_aliases)])


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, ctx: ServerContext = Depends(get_context)) -> ModelCard:
    """The served model by name (404 for any other name)."""
    ctx.check_model(model)
    return _card(ctx, model)


def _disconnected() -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


@router.post("/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(req: CompletionRequest, request: Request,
                      ctx: ServerContext = Depends(get_context)) -> Response:
    """OpenAI completions (``stream: true`` answers with server-sent events)."""
    try:
        return await create_completion(ctx, req, request)
    except ClientDisconnected:
        return _disconnected()


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           ctx: ServerContext = Depends(get_context)) -> Response:
    """OpenAI chat completions (``stream: true`` answers with server-sent events)."""
    try:
        return await create_chat_completion(ctx, req, request)
    except ClientDisconnected:
        return _disconnected()

