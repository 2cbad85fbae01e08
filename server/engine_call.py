"""One HTTP request's generation: its prompts admitted and sent through the engine client,
their output deltas merged, metrics recorded, and everything aborted when the client goes away.

Every route that generates goes through :class:`EngineCall`, so validation errors, queue-full
and dead-engine errors, abort-on-disconnect and latency metrics behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.core.runtime.outputs import FinishKind, FinishReason, RequestOutput, TokenLogprob
from heteroserve.core.scheduler.outputs import SHUTDOWN_CODE
from heteroserve.core.runtime.registry import RequestStream
from heteroserve.server.errors import APIError, engine_error
from heteroserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the response was ready."""


def finish_error(reason: FinishReason) -> APIError | None:
    """The error a request that ended with ``reason`` must answer with, or None: an engine
    shutdown is a 503, a failure inside the engine a 500 (aborts by the client are not
    errors: they answer with finish_reason ``abort``)."""
    if reason.kind is not FinishKind.ERROR:
        return None
    message = reason.message or "the request failed in the engine"
    if reason.code == SHUTDOWN_CODE:
        return APIError(503, message, code="server_shutting_down")
    return APIError(500, message, code="engine_error")


@dataclass
class ChoiceResult:
    """One choice's deltas folded together (for non-streaming replies)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.num_tokens += len(out.token_ids)
        self.logprobs += out.logprobs or []
        self.prompt_logprobs += out.prompt_logprobs or []
        self.last = out

    @property
    def finish(self) -> FinishReason | None:
        return self.last.finish if self.last is not None else None


class EngineCall:
    """Admit ``reqs`` (one per prompt) with ``client`` and merge their outputs.

    :meth:`start` admits every prompt (so every prompt is validated before the reply starts);
    failures raise :class:`APIError` (400 invalid, 429 queue full, 503 dead engine).
    :meth:`outputs` yields ``(prompt_index, RequestOutput)`` deltas as they arrive (``index``
    is the choice within the prompt); it can be iterated once. Leaving it early (or
    :meth:`abort`) aborts every unfinished choice in the engine, which frees its KV cache.
    """

    def __init__(self, client: Any, streams: list[RequestStream],
                 metrics: ServerMetrics | None) -> None:
        self.client, self.streams, self.metrics = client, streams, metrics
        self._done = False

    @classmethod
    async def start(cls, client: Any, reqs: list[GenerateRequest],
                    metrics: ServerMetrics | None) -> EngineCall:
        if not client.is_alive():
            raise APIError(503, "the engine process is not running", code="engine_dead")
        streams: list[RequestStream] = []
        try:
            for req in reqs:
                streams.append(await client.generate(req))
        except BaseException as exc:
            for stream in streams:
                await stream.aclose()
            if isinstance(exc, Exception):
                raise engine_error(exc) from None
            raise
        return cls(client, streams, metrics)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas as they arrive (see the class docstring); raises :class:`APIError` when the
        engine fails a request mid-way."""
        try:
            if len(self.streams) == 1:
                async for out in self.streams[0]:
                    self._observe(out)
                    yield 0, out
            else:
                async for item in self._merged():
                    self._observe(item[1])
                    yield item
            self._done = True
        except APIError:
            raise
        except Exception as exc:
            raise engine_error(exc) from None
        finally:
            if not self._done:
                await self.abort()

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(_END)

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is _END:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _observe(self, out: RequestOutput) -> None:
        if self.metrics is not None:
            self.metrics.observe(out)

    async def abort(self) -> None:
        """Abort every choice of this call that is still running (idempotent)."""
        for stream in self.streams:
            await stream.aclose()

    def abort_now(self) -> None:
        """:meth:`abort` for synchronous callers (a disconnect callback)."""
        for stream in self.streams:
            self.client.abort(stream.rid)

    async def results(self) -> list[list[ChoiceResult]]:
        """Wait for every choice; returns per prompt its folded choices ordered by index.
        Raises :class:`APIError` when a choice ended with an engine error."""
        per_prompt = [[ChoiceResult(i) for i in range(s.n)] for s in self.streams]
        async for p, out in self.outputs():
            per_prompt[p][out.index].add(out)
        for choices in per_prompt:
            for choice in choices:
                err = finish_error(choice.finish) if choice.finish is not None else None
                if err is not None:
                    raise err
        return per_prompt


async def until_disconnect(request: Request, work: Awaitable[T], on_disconnect: Any) -> T:
    """Await ``work`` unless the client disconnects first; then call ``on_disconnect()``,
    cancel ``work`` and raise :class:`ClientDisconnected`. For non-streaming replies
    (streaming replies are cancelled by Starlette itself when the client leaves)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    on_disconnect()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientDisconnected()


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` (JSON-encoded unless it is already a str)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A ``text/event-stream`` response over ``events`` (unbuffered by proxies)."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def stream_error_event(exc: BaseException) -> str:
    """An error raised after a stream started, as the SSE event OpenAI clients understand."""
    err = exc if isinstance(exc, APIError) else engine_error(exc)
    return sse(err.body())

