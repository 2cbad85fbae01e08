"""``POST /v1/completions``: OpenAI's legacy completions over the engine.

Each prompt becomes one engine request with ``n`` choices; choice ``index`` is
``prompt_index * n + choice``. Streaming sends text deltas (``data: {...}``), a final usage
chunk when ``stream_options.include_usage``, then ``data: [DONE]``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.core.runtime.outputs import RequestOutput
from heteroserve.core.runtime.outputs import Usage as EngineUsage
from heteroserve.server import logprobs as lp
from heteroserve.server.context import (
    ServerContext, finish_reason, new_id, openai_json, sub_rid, usage,
)
from heteroserve.server.engine_call import (
    SSE_DONE, ChoiceResult, EngineCall, finish_error, sse, sse_response, stream_error_event,
    until_disconnect,
)
from heteroserve.server.errors import APIError, bad_request
from heteroserve.server.protocol import (
    CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
    CompletionResponse,
)
from heteroserve.server.sampling import sampling_params

Prompt = str | list[int]


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise bad_request("prompt must not be empty", "prompt")
    return prompts


def _check_supported(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", "best_of")


@dataclass
class _Shape:
    """How this request's choices are rendered: ``echo`` text per prompt, logprobs or not
    (``top``: with alternatives), the choices per prompt."""

    echoes: list[str]
    want_lp: bool
    top: bool
    n: int


@dataclass
class _ChoiceStream:
    """What a streaming choice has sent so far: the text offset of its next logprob entry,
    whether its echo went out, its latest usage."""

    offset: int = 0
    started: bool = False
    usage: EngineUsage | None = None


def _logprobs(prompt_part: list, generated: list, offset: int, top: bool
              ) -> tuple[CompletionLogprobs, int]:
    """Prompt entries (echo) then generated ones, from text offset ``offset``."""
    first, offset = lp.completion_logprobs(prompt_part, offset, top)
    second, offset = lp.completion_logprobs(generated, offset, top)
    return lp.merge_completion_logprobs([first, second]), offset


def _choice(result: ChoiceResult, index: int, echo: str, shape: _Shape) -> CompletionChoice:
    reason, matched = finish_reason(result.finish)
    logprobs = None
    if shape.want_lp:
        logprobs, _ = _logprobs(result.prompt_logprobs, result.logprobs, 0, shape.top)
    return CompletionChoice(index=index, text=echo + result.text, logprobs=logprobs,
                            finish_reason=reason, matched_stop=matched)


def _named_as_prompt(err: APIError) -> APIError:
    """The engine names a token-id prompt ``input_ids`` (SGLang's field); here it is
    ``prompt``, and the error says so."""
    if err.param != "input_ids":
        return err
    return APIError(err.status, err.message.replace("input_ids", "prompt", 1), type=err.type,
                    param="prompt", code=err.code, headers=err.headers)


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request
                            ) -> Response:
    """Serve one completions request (see the module docstring); raises :class:`APIError`."""
    ctx.check_model(req.model)
    _check_supported(req)
    prompts = _prompts(req.prompt)
    params = sampling_params(req, req.max_tokens)
    want_lp = req.logprobs is not None
    rid = req.rid or new_id("cmpl")
    gen = [GenerateRequest(text=p if isinstance(p, str) else None,
                           input_ids=None if isinstance(p, str) else p,
                           sampling_params=dataclasses.replace(params), n=req.n,
                           rid=sub_rid(rid, i, len(prompts)), stream=req.stream,
                           return_logprob=want_lp, top_logprobs_num=req.logprobs or 0,
                           logprob_start_len=0 if req.echo and want_lp else -1,
                           add_special_tokens=req.add_special_tokens is not False,
                           truncate_prompt_tokens=req.truncate_prompt_tokens)
           for i, p in enumerate(prompts)]
    try:
        call = await EngineCall.start(ctx.client, gen, ctx.metrics)
    except APIError as err:
        raise _named_as_prompt(err) from None
    echoes = [(p if isinstance(p, str) else ctx.tokenizer.decode(p)) if req.echo else ""
              for p in prompts]
    shape = _Shape(echoes, want_lp, bool(req.logprobs), req.n)
    model = req.model or ctx.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(_stream(call, rid, model, shape, include_usage))
    results = await until_disconnect(request, call.results(), call.abort_now)
    choices = [_choice(r, p * req.n + r.index, echoes[p], shape)
               for p, per_prompt in enumerate(results) for r in per_prompt]
    body = CompletionResponse(id=rid, model=model, choices=choices, usage=usage(
        [[r.last.usage if r.last else None for r in per_prompt] for per_prompt in results]))
    return JSONResponse(openai_json(body))


def _chunk(out: RequestOutput, p: int, st: _ChoiceStream, shape: _Shape) -> dict | None:
    """The stream chunk's choice (as JSON-ready data: this runs once per token per stream)
    for delta ``out`` of prompt ``p``; None when there is nothing to send."""
    text = out.text
    if not st.started:
        text, st.started = shape.echoes[p] + text, True
    logprobs = None
    if shape.want_lp and (out.logprobs or out.prompt_logprobs):
        logprobs, st.offset = _logprobs(out.prompt_logprobs or [], out.logprobs or [],
                                        st.offset, shape.top)
    if not text and logprobs is None and not out.finished:
        return None
    reason, matched = finish_reason(out.finish)
    choice = {"index": p * shape.n + out.index, "text": text,
              "logprobs": None if logprobs is None else logprobs.model_dump(exclude_none=True),
              "finish_reason": reason}
    if matched is not None:
        choice["matched_stop"] = matched
    return choice


async def _stream(call: EngineCall, rid: str, model: str, shape: _Shape,
                  include_usage: bool) -> AsyncIterator[str]:
    states: dict[tuple[int, int], _ChoiceStream] = {}
    head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
    try:
        async for p, out in call.outputs():
            st = states.setdefault((p, out.index), _ChoiceStream())
            st.usage = out.usage
            if out.finish is not None:
                err = finish_error(out.finish)
                if err is not None:
                    raise err
            choice = _chunk(out, p, st, shape)
            if choice is not None:
                yield sse({**head, "choices": [choice]})
        if include_usage:
            per_prompt = [[st.usage for (pp, _), st in sorted(states.items()) if pp == p]
                          for p in range(len(shape.echoes))]
            yield sse(CompletionChunk(id=rid, model=model, choices=[],
                                      usage=usage(per_prompt)).model_dump(exclude_none=True))
    except APIError as exc:
        yield stream_error_event(exc)
    yield SSE_DONE
