"""``POST /v1/completions``: OpenAI's legacy completions over the engine.

Each prompt becomes one engine request with ``n`` choices; choice ``index`` is
``prompt_index * n + choice``. Streaming sends text deltas (``data: {...}``), a final usage
chunk when ``stream_options.include_usage``, then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.server import logprobs as lp
from heteroserve.server.context import (
    ServerContext, finish_reason, new_id, openai_json, sub_rid, usage,
)
from heteroserve.server.engine_call import (
    SSE_DONE, EngineCall, is_final, sse, sse_response, stream_error_event, until_disconnect,
)
from heteroserve.server.errors import APIError, bad_request
from heteroserve.server.protocol import (
    CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse,
)
from heteroserve.server.sampling import sampling_params

Prompt = str | list[int]


def _prompts(prompt: Any) -> list[Prompt]:
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise bad_request("prompt must not be empty", "prompt")
    return prompts


def _check_supported(req: CompletionRequest) -> None:
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported", "best_of")


@dataclass
class _ChoiceStream:
    """What a streaming choice has sent so far."""

    text_len: int = 0
    logprobs: int = 0
    offset: int = 0
    started: bool = False


def _choice(out: dict[str, Any], index: int, echo: str, want_lp: bool, top: bool
            ) -> CompletionChoice:
    meta = out["meta_info"]
    reason, matched = finish_reason(meta)
    logprobs = lp.completion_logprobs(meta, 0, len(echo), top)[0] if want_lp else None
    return CompletionChoice(index=index, text=echo + out["text"], logprobs=logprobs,
                            finish_reason=reason, matched_stop=matched)


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request
                            ) -> Response:
    """Serve one completions request (see the module docstring); raises :class:`APIError`."""
    ctx.check_model(req.model)
    _check_supported(req)
    prompts = _prompts(req.prompt)
    params = sampling_params(req, req.max_tokens)
    want_lp = req.logprobs is not None
    top = bool(req.logprobs)
    rid = req.rid or new_id("cmpl")
    gen = [GenerateRequest(text=p if isinstance(p, str) else None,
                           input_ids=None if isinstance(p, str) else p,
                           sampling_params=dict(params), rid=sub_rid(rid, i, len(prompts)),
                           stream=req.stream, return_logprob=want_lp,
                           top_logprobs_num=req.logprobs or 0)
           for i, p in enumerate(prompts)]
    call = EngineCall(ctx.client, gen, ctx.metrics)
    echoes = [(p if isinstance(p, str) else ctx.tokenizer.decode(p)) if req.echo else ""
              for p in prompts]
    model = req.model or ctx.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(_stream(call, rid, model, req.n, echoes, want_lp, top,
                                    include_usage))
    finals = await until_disconnect(request, call.finals(), call.abort)
    choices = [_choice(out, p * req.n + c, echoes[p], want_lp, top)
               for p, outs in enumerate(finals) for c, out in enumerate(outs)]
    body = CompletionResponse(id=rid, model=model, choices=choices, usage=usage(finals))
    return JSONResponse(openai_json(body))


async def _stream(call: EngineCall, rid: str, model: str, n: int, echoes: list[str],
                  want_lp: bool, top: bool, include_usage: bool) -> AsyncIterator[str]:
    states: dict[int, _ChoiceStream] = {}
    finals: list[list[dict[str, Any]]] = [[] for _ in echoes]
    try:
        async for p, out in call.outputs():
            index = p * n + int(out.get("index", 0))
            st = states.setdefault(index, _ChoiceStream(offset=len(echoes[p])))
            meta = out["meta_info"]
            text = out["text"]
            delta = text[st.text_len:]
            st.text_len = len(text)
            if not st.started:
                delta, st.started = echoes[p] + delta, True
            logprobs = None
            if want_lp and lp.count(meta) > st.logprobs:
                logprobs, st.offset = lp.completion_logprobs(meta, st.logprobs, st.offset, top)
                st.logprobs = lp.count(meta)
            reason, matched = finish_reason(meta)
            if is_final(out):
                finals[p].append(out)
            elif not delta and logprobs is None:
                continue
            chunk = CompletionChunk(id=rid, model=model, choices=[CompletionChoice(
                index=index, text=delta, logprobs=logprobs, finish_reason=reason,
                matched_stop=matched)])
            yield sse(openai_json(chunk))
        if include_usage:
            yield sse(CompletionChunk(id=rid, model=model, choices=[],
                                      usage=usage(finals)).model_dump(exclude_none=True))
    except APIError as exc:
        yield stream_error_event(exc)
    yield SSE_DONE
