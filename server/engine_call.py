"""One HTTP request's generation: its prompts sent through ``EngineClient.generate``, their
outputs merged, metrics recorded, and everything aborted when the client goes away.

Every route that generates goes through :class:`EngineCall`, so validation errors, queue-full
and dead-engine errors, abort-on-disconnect and latency metrics behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.server.errors import APIError, engine_error
from heteroserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
Output = dict[str, Any]
_END = object()


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the response was ready."""


def is_final(out: Output) -> bool:
    """True for the last dict of a choice (its ``finish_reason`` is set)."""
    return out["meta_info"].get("finish_reason") is not None


class EngineCall:
    """Send ``reqs`` (one per prompt) to ``client`` and merge their outputs.

    The constructor calls ``client.generate`` for every prompt, so every prompt is validated
    before any is sent; failures raise :class:`APIError` (400 invalid, 429 queue full, 503 dead
    engine). :meth:`outputs` yields ``(prompt_index, output)`` pairs where ``output`` is the
    client's SGLang-shaped dict (``index`` is the choice within the prompt); it can be
    iterated once. Leaving it early (or :meth:`abort`) aborts every unfinished choice in the
    engine, which frees its KV cache.
    """

    def __init__(self, client: Any, reqs: list[GenerateRequest], metrics: ServerMetrics | None
                 ) -> None:
        self.client = client
        self.rids = [r.rid for r in reqs]
        self.metrics = metrics
        self._done = False
        if not client.is_alive():
            raise APIError(503, "the engine process is not running", code="engine_dead")
        try:
            self._iters = [client.generate(r) for r in reqs]
        except Exception as exc:
            raise engine_error(exc) from None

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """Outputs as they arrive (see the class docstring); raises :class:`APIError` when the
        engine fails a request mid-way."""
        try:
            if len(self._iters) == 1:
                async for out in self._iters[0]:
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
                self.abort()

    async def _merged(self) -> AsyncIterator[tuple[int, Output]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, it: AsyncIterator[Output]) -> None:
            try:
                async for out in it:
                    await queue.put((i, out))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(_END)

        tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(self._iters)]
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

    def _observe(self, out: Output) -> None:
        if self.metrics is not None and is_final(out):
            self.metrics.observe_finished(out["meta_info"])

    def abort(self) -> None:
        """Abort every choice of this call that is still running (idempotent)."""
        for rid in self.rids:
            if rid is not None:
                self.client.abort(rid)

    async def finals(self) -> list[list[Output]]:
        """Wait for every choice; returns per prompt its final dicts ordered by choice."""
        per_prompt: list[dict[int, Output]] = [{} for _ in self.rids]
        async for i, out in self.outputs():
            if is_final(out):
                per_prompt[i][int(out.get("index", 0))] = out
        return [[d[k] for k in sorted(d)] for d in per_prompt]


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
