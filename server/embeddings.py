"""``POST /v1/embeddings``: OpenAI's embeddings API for decoder models.

Each input (a string, or a list of token ids) becomes one prefill-only engine request whose
final-norm hidden states are pooled (``last`` token or ``mean``, ``--embedding-pooling``,
overridable per request with the ``pooling`` extension field) and scaled to unit L2 norm
(unless ``--disable-embedding-normalize`` or ``normalize: false``). Strings are tokenized
first (off the event loop) so that the request's limits are checked before anything runs:
at most :data:`MAX_INPUTS` inputs, each within the context window, and
:data:`MAX_REQUEST_TOKENS` tokens in all (OpenAI's limits; a 400 otherwise).

``dimensions`` is accepted only when it equals the model's hidden size: a causal LM is not
trained for Matryoshka truncation, so a shorter vector would not be a meaningful embedding.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from heteroserve.core.model_runner.pooling import EmbedSpec
from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.server.auth import require_api_key
from heteroserve.server.context import ServerContext, get_context, new_id, sub_rid
from heteroserve.server.engine_call import (
    ChoiceResult, ClientDisconnected, EngineCall, until_disconnect,
)
from heteroserve.server.errors import APIError, bad_request, engine_error
from heteroserve.server.json_body import OffLoopJSONRoute
from heteroserve.server.protocol import ErrorResponse

#: most inputs in one request (OpenAI's limit)
MAX_INPUTS = 2048
#: most tokens summed over a request's inputs (OpenAI's limit)
MAX_REQUEST_TOKENS = 300_000

EmbeddingInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request plus two extensions: ``pooling`` (``last`` | ``mean``)
    and ``normalize`` (unit L2 norm); both default to the server's flags. Unknown fields
    are ignored, as on the other OpenAI routes."""

    model_config = ConfigDict(extra="allow")

    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    pooling: Literal["last", "mean"] | None = None
    normalize: StrictBool | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _inputs(raw: EmbeddingInput) -> list[str | list[int]]:
    """The request's inputs, one per embedding; 400 when empty or too many."""
    if isinstance(raw, str):
        inputs: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        inputs = [list(raw)]  # type: ignore[arg-type]
    else:
        inputs = list(raw)  # type: ignore[arg-type]
    if not inputs:
        raise bad_request("input must not be empty", "input")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"input has {len(inputs)} items; at most {MAX_INPUTS} per request",
                          "input")
    for i, item in enumerate(inputs):
        if len(item) == 0:
            raise bad_request(f"input[{i}] is empty", "input")
    return inputs


async def _token_ids(ctx: ServerContext, inputs: list[str | list[int]]) -> list[list[int]]:
    """Every input as token ids (strings tokenized in the admission pool), with the
    request-wide token limit checked."""
    texts = [x for x in inputs if isinstance(x, str)]
    try:
        encoded = iter(await asyncio.gather(*(ctx.client.admission.tokenize(x) for x in texts)))
    except Exception as exc:
        raise engine_error(exc) from None
    ids = [next(encoded) if isinstance(x, str) else x for x in inputs]
    total = sum(len(x) for x in ids)
    if total > MAX_REQUEST_TOKENS:
        raise bad_request(f"the inputs have {total} tokens in all; at most "
                          f"{MAX_REQUEST_TOKENS} per request", "input")
    return ids


def _spec(ctx: ServerContext, req: EmbeddingRequest) -> EmbedSpec:
    args = ctx.server_args
    normalize = not args.disable_embedding_normalize if req.normalize is None else req.normalize
    return EmbedSpec.of(req.pooling or args.embedding_pooling, normalize)


def _check_dimensions(ctx: ServerContext, dimensions: int | None) -> None:
    hidden = ctx.client.info.hidden_size
    if dimensions is not None and dimensions != hidden:
        raise bad_request(f"dimensions={dimensions} is not supported: this model's embeddings "
                          f"have {hidden} dimensions (it is not trained for Matryoshka "
                          "truncation)", "dimensions")


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    """``float``: the list; ``base64``: little-endian float32 bytes, base64 (what OpenAI's
    client decodes with ``numpy.frombuffer(..., dtype="float32")``)."""
    if fmt == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def create_embedding(ctx: ServerContext, req: EmbeddingRequest, request: Request
                           ) -> JSONResponse:
    """Serve one embeddings request (see the module docstring); raises :class:`APIError`."""
    ctx.check_model(req.model)
    _check_dimensions(ctx, req.dimensions)
    spec = _spec(ctx, req)
    ids = await _token_ids(ctx, _inputs(req.input))
    rid = new_id("embd")
    gen = [GenerateRequest(input_ids=x, rid=sub_rid(rid, i, len(ids)), embed=spec)
           for i, x in enumerate(ids)]
    call = await EngineCall.start(ctx.client, gen, ctx.metrics)
    results = await until_disconnect(request, call.results(), call.abort_now)
    data = [Embedding(index=i, embedding=_encode(_vector(per_prompt[0]), req.encoding_format))
            for i, per_prompt in enumerate(results)]
    tokens = sum(len(x) for x in ids)
    body = EmbeddingResponse(data=data, model=req.model or ctx.model_name,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
    return JSONResponse(body.model_dump())


def _vector(result: ChoiceResult) -> list[float]:
    last = result.last
    if last is None or last.embedding is None:
        reason = last.finish.message if last is not None and last.finish else None
        raise APIError(500, f"the engine returned no embedding ({reason or 'unknown'})",
                       code="engine_error")
    return last.embedding


router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)],
                   responses={s: {"model": ErrorResponse} for s in (400, 401, 404, 429, 503)},
                   route_class=OffLoopJSONRoute)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(req: EmbeddingRequest, request: Request,
                     ctx: ServerContext = Depends(get_context)) -> Response:
    """OpenAI embeddings of a decoder model's final hidden states (see the module docstring)."""
    try:
        return await create_embedding(ctx, req, request)
    except ClientDisconnected:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
