"""SGLang's native routes: ``/generate``, ``/abort_request``, ``/get_model_info``,
``/get_server_info``, plus the operational ones: ``/health``, ``/health_generate``,
``/metrics``.

``/generate`` takes ``text`` or ``input_ids`` (one prompt or a batch) and SGLang sampling
parameters and answers with the engine's own dicts (``text``, ``output_ids``, ``meta_info``):
one dict for a single prompt with ``n == 1``, else a list (prompt-major, ``n`` per prompt).
With ``stream`` it sends cumulative dicts as server-sent events, then ``data: [DONE]`` (SGLang's
shape: the only place besides the offline ``Engine`` where deltas are folded back into
cumulative dicts, by :class:`SGLangAccumulator`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from heteroserve.core.runtime.errors import one_line
from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.core.runtime.sglang_output import SGLangAccumulator
from heteroserve.server.auth import require_api_key
from heteroserve.server.context import ServerContext, get_context
from heteroserve.server.engine_call import (
    SSE_DONE, ClientDisconnected, EngineCall, finish_error, sse, sse_response,
    stream_error_event, until_disconnect,
)
from heteroserve.server.errors import APIError, bad_request
from heteroserve.server.json_body import OffLoopJSONRoute
from heteroserve.server.protocol import AbortReqInput, ErrorResponse, GenerateReqInput

HEALTH_GENERATE_TIMEOUT_S = 20.0

ops_router = APIRouter(tags=["operations"])
native_router = APIRouter(tags=["native"], dependencies=[Depends(require_api_key)],
                          responses={s: {"model": ErrorResponse} for s in (400, 401, 429, 503)},
                          route_class=OffLoopJSONRoute)


def json_safe(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats (a ``-inf`` logprob) as
    ``-9999.0`` / ``None``, so that it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else math.copysign(9999.0, value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _per_prompt(value: Any, count: int, name: str, is_list: bool) -> list[Any]:
    if is_list:
        if len(value) != count:
            raise bad_request(f"got {len(value)} {name} for {count} prompts", name)
        return list(value)
    return [value] * count


def _requests(req: GenerateReqInput) -> tuple[list[GenerateRequest], bool]:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text or input_ids", "text")
    if req.text is not None:
        batch = isinstance(req.text, list)
        prompts: list[Any] = list(req.text) if batch else [req.text]
        key = "text"
    else:
        ids = req.input_ids or []
        batch = bool(ids) and isinstance(ids[0], list)
        prompts = list(ids) if batch else [ids]
        key = "input_ids"
    if not prompts:
        raise bad_request(f"{key} must not be empty", key)
    params = _per_prompt(req.sampling_params or {}, len(prompts), "sampling_params",
                         isinstance(req.sampling_params, list))
    if isinstance(req.rid, list):
        rids = _per_prompt(req.rid, len(prompts), "rid", True)
    else:
        rids = [req.rid if not batch or req.rid is None else f"{req.rid}-p{i}"
                for i in range(len(prompts))]
    out = [GenerateRequest(**{key: p}, sampling_params=dict(sp), rid=rid, stream=req.stream,
                           return_logprob=req.return_logprob,
                           top_logprobs_num=req.top_logprobs_num,
                           logprob_start_len=-1 if req.logprob_start_len is None
                           else req.logprob_start_len)
           for p, sp, rid in zip(prompts, params, rids)]
    return out, batch


def _accumulators(call: EngineCall, reqs: list[GenerateRequest]) -> list[list[SGLangAccumulator]]:
    return [[SGLangAccumulator(rid, i, r.top_logprobs_num > 0) for i, rid in enumerate(s.rids)]
            for s, r in zip(call.streams, reqs)]


@native_router.post("/generate")
async def generate(req: GenerateReqInput, request: Request,
                   ctx: ServerContext = Depends(get_context)) -> Response:
    """SGLang's generate (see the module docstring)."""
    gen, batch = _requests(req)
    call = await EngineCall.start(ctx.client, gen, ctx.metrics)
    accs = _accumulators(call, gen)
    if req.stream:
        return sse_response(_stream(call, accs))

    async def collect() -> list[dict[str, Any]]:
        async for p, out in call.outputs():
            if out.finish is not None and finish_error(out.finish) is not None:
                raise finish_error(out.finish)  # type: ignore[misc]
            accs[p][out.index].add(out)
        return [json_safe(a.to_dict()) for per_prompt in accs for a in per_prompt]

    try:
        flat = await until_disconnect(request, collect(), call.abort_now)
    except ClientDisconnected:
        return Response(status_code=499)
    return JSONResponse(flat if batch or len(flat) != 1 else flat[0])


async def _stream(call: EngineCall, accs: list[list[SGLangAccumulator]]) -> AsyncIterator[str]:
    try:
        async for p, out in call.outputs():
            if out.finish is not None and finish_error(out.finish) is not None:
                raise finish_error(out.finish)  # type: ignore[misc]
            data = accs[p][out.index].add(out)
            n = len(accs[p])
            yield sse(json_safe({**data, "index": p * n + out.index}))
    except APIError as exc:
        yield stream_error_event(exc)
    yield SSE_DONE


@native_router.post("/abort_request")
async def abort_request(req: AbortReqInput, ctx: ServerContext = Depends(get_context)
                        ) -> dict[str, Any]:
    """Abort request ``rid`` (all its choices); unknown ids are ignored."""
    ctx.client.abort(req.rid)
    return {"rid": req.rid, "aborted": True}


@native_router.get("/get_model_info")
async def get_model_info(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """The served model: path, tokenizer path, served name."""
    sa = ctx.server_args
    return {"model_path": sa.model_path, "tokenizer_path": sa.tokenizer_path or sa.model_path,
            "served_model_name": ctx.model_name, "is_generation": True}


@native_router.get("/get_server_info")
async def get_server_info(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Server arguments (without the API key), what the engine resolved at start-up, and the
    latest engine statistics."""
    args = dataclasses.asdict(ctx.server_args)
    args.pop("api_key", None)
    info = ctx.client.info
    stats = ctx.client.get_stats()
    # SGLang's clients (bench_serving) read per-rank internal states; no speculative decoding
    internal = {"avg_spec_accept_length": None, "num_running_reqs": stats.get("num_running"),
                "num_waiting_reqs": stats.get("num_waiting"), "token_usage": stats.get("kv_usage")}
    return json_safe({**args, "engine": dataclasses.asdict(info), "stats": stats,
                      "internal_states": [internal]})


@ops_router.get("/health")
async def health(ctx: ServerContext = Depends(get_context)) -> Response:
    """200 while the engine process is alive, else 503."""
    if not ctx.client.is_alive():
        return APIError(503, "the engine process is not running", code="engine_dead").response()
    return Response(status_code=200)


@ops_router.get("/health_generate")
async def health_generate(ctx: ServerContext = Depends(get_context)) -> Response:
    """Generate one token end to end: 200 when it works, 503 when the engine cannot."""
    if not ctx.client.is_alive():
        return APIError(503, "the engine process is not running", code="engine_dead").response()
    try:
        await ctx.client.health_generate(timeout=HEALTH_GENERATE_TIMEOUT_S)
    except Exception as exc:
        return APIError(503, f"health generation failed: {one_line(exc)}",
                        code="engine_unhealthy").response()
    return Response(status_code=200)


@ops_router.get("/metrics")
async def metrics(ctx: ServerContext = Depends(get_context)) -> Response:
    """Prometheus metrics (see :mod:`~heteroserve.server.metrics`)."""
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
