"""The offline engine: ``heteroserve.Engine``, SGLang's ``sgl.Engine`` API in-process.

The engine starts the scheduler process through an :class:`EngineClient` and runs an asyncio
loop in a background thread for the synchronous API; ``async_generate`` runs on the caller's
own loop. The scheduler runs as a fresh interpreter, so a plain script needs no
``if __name__ == "__main__":`` guard. Results are SGLang's cumulative dicts, folded from the
engine's deltas by :class:`SGLangAccumulator`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from heteroserve.core.config import ServerArgs
from heteroserve.core.model_runner.pooling import EmbedSpec
from heteroserve.core.runtime.errors import RequestError
from heteroserve.core.runtime.frontend import EngineClient
from heteroserve.core.runtime.io_struct import GenerateRequest
from heteroserve.core.runtime.outputs import FinishKind
from heteroserve.core.runtime.registry import RequestStream
from heteroserve.core.runtime.sglang_output import SGLangAccumulator

Output = dict[str, Any]


def _as_batch(prompt: Any, input_ids: Any) -> tuple[list[GenerateRequest], bool]:
    """Requests for ``prompt`` / ``input_ids`` and whether the call was a batch."""
    if (prompt is None) == (input_ids is None):
        raise RequestError("give exactly one of prompt or input_ids")
    if prompt is not None:
        if isinstance(prompt, str):
            return [GenerateRequest(text=prompt)], False
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            return [GenerateRequest(text=p) for p in prompt], True
        raise RequestError("prompt must be a string or a non-empty list of strings")
    if isinstance(input_ids, (list, tuple)) and input_ids and all(
            isinstance(x, (list, tuple)) for x in input_ids):
        return [GenerateRequest(input_ids=list(ids)) for ids in input_ids], True
    if isinstance(input_ids, (list, tuple)):
        return [GenerateRequest(input_ids=list(input_ids))], False
    raise RequestError("input_ids must be a list of ints or a list of lists of ints")


class Engine:
    """An in-process engine (SGLang's ``Engine`` names).

    ``Engine(model_path=None, platform="auto", **server_args)``: keyword arguments are
    :class:`ServerArgs` fields (unknown names raise ``TypeError``); ``model_path=None`` builds
    and serves the default tiny model. Unlike the server, the grammar compiler processes
    start at the first structured-output request (``lazy_grammar_workers=False``: at start-up).
    Start-up failures raise ``RuntimeError`` (one line).
    Use as a context manager or call :meth:`shutdown`.
    """

    def __init__(self, model_path: str | None = None, platform: str = "auto",
                 **kwargs: Any) -> None:
        if model_path is None:
            from heteroserve.core.models.tiny import ensure_default_model

            model_path = str(ensure_default_model())
        kwargs.setdefault("lazy_grammar_workers", True)
        self.server_args = ServerArgs.from_kwargs(model_path=str(model_path), platform=platform,
                                                  **kwargs)
        self.client = EngineClient(self.server_args)
        self.tokenizer = self.client.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="heteroserve-engine-loop", daemon=True)
        self._thread.start()

    @property
    def info(self) -> Any:
        """What the scheduler resolved at start-up (:class:`ReadyInfo`)."""
        return self.client.info

    # -- request building ----------------------------------------------------------------------

    def _requests(self, prompt: Any, sampling_params: Any, input_ids: Any, return_logprob: bool,
                  top_logprobs_num: int, logprob_start_len: int | None, stream: bool,
                  rid: Any) -> tuple[list[GenerateRequest], bool]:
        reqs, batch = _as_batch(prompt, input_ids)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(reqs):
                raise RequestError(f"got {len(sampling_params)} sampling_params for "
                                   f"{len(reqs)} prompts")
            params = [dict(p or {}) for p in sampling_params]
        elif sampling_params is None or isinstance(sampling_params, dict):
            params = [dict(sampling_params or {}) for _ in reqs]
        else:
            raise RequestError("sampling_params must be a dict or a list of dicts")
        rids = rid if isinstance(rid, (list, tuple)) else [rid] * len(reqs)
        if rid is not None and len(reqs) > 1 and not isinstance(rid, (list, tuple)):
            rids = [f"{rid}-{i}" for i in range(len(reqs))]
        for req, p, r in zip(reqs, params, rids):
            req.sampling_params = p
            req.rid = r
            req.return_logprob = return_logprob
            req.top_logprobs_num = top_logprobs_num
            req.logprob_start_len = -1 if logprob_start_len is None else logprob_start_len
            req.stream = stream
        return reqs, batch

    @staticmethod
    def _shape(results: list[list[Output]], batch: bool) -> Output | list[Output]:
        flat = [o for choices in results for o in choices]
        return flat if batch or len(flat) > 1 else flat[0]

    async def _start(self, reqs: list[GenerateRequest]) -> list[RequestStream]:
        """Admit every request before any is sent; a failure aborts those already sent."""
        streams: list[RequestStream] = []
        try:
            for req in reqs:
                streams.append(await self.client.generate(req))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    async def _collect(self, reqs: list[GenerateRequest]) -> list[list[Output]]:
        streams = await self._start(reqs)

        async def finals(stream: RequestStream, req: GenerateRequest) -> list[Output]:
            accs = [SGLangAccumulator(rid, i, req.top_logprobs_num > 0)
                    for i, rid in enumerate(stream.rids)]
            for out in [o async for o in stream]:
                accs[out.index].add(out)
            return [a.to_dict() for a in accs]

        return list(await asyncio.gather(*(finals(s, r) for s, r in zip(streams, reqs))))

    @staticmethod
    async def _cumulative(stream: RequestStream, req: GenerateRequest
                          ) -> AsyncIterator[Output]:
        accs = [SGLangAccumulator(rid, i, req.top_logprobs_num > 0)
                for i, rid in enumerate(stream.rids)]
        async for out in stream:
            yield accs[out.index].add(out)

    # -- public API ------------------------------------------------------------------------------

    def generate(self, prompt: str | list[str] | None = None,
                 sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 return_logprob: bool = False, top_logprobs_num: int = 0,
                 logprob_start_len: int | None = None, stream: bool = False,
                 rid: str | list[str] | None = None) -> Output | list[Output] | Iterator[Output]:
        """Generate for one prompt (returns a dict) or a batch (returns a list, prompt-major
        with ``n`` choices each); with ``n > 1`` a single prompt also returns a list. With
        ``stream=True`` (one prompt only) returns an iterator of cumulative chunk dicts, the
        last one carrying ``finish_reason``. Raises :class:`RequestError` (a ``ValueError``)
        on invalid input before anything runs."""
        reqs, batch = self._requests(prompt, sampling_params, input_ids, return_logprob,
                                     top_logprobs_num, logprob_start_len, stream, rid)
        if stream:
            if len(reqs) != 1:
                raise RequestError("stream=True takes a single prompt")
            return self._stream_sync(reqs[0])
        future = asyncio.run_coroutine_threadsafe(self._collect(reqs), self._loop)
        return self._shape(future.result(), batch)

    def _stream_sync(self, req: GenerateRequest) -> Iterator[Output]:
        async def start() -> AsyncIterator[Output]:
            return self._cumulative((await self._start([req]))[0], req)

        agen = asyncio.run_coroutine_threadsafe(start(), self._loop).result()

        def iterate() -> Iterator[Output]:
            try:
                while True:
                    try:
                        yield asyncio.run_coroutine_threadsafe(
                            agen.__anext__(), self._loop).result()
                    except StopAsyncIteration:
                        return
            finally:
                if self._loop.is_running():
                    asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()

        return iterate()

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             return_logprob: bool = False, top_logprobs_num: int = 0,
                             logprob_start_len: int | None = None, stream: bool = False,
                             rid: str | list[str] | None = None
                             ) -> Output | list[Output] | AsyncIterator[Output]:
        """Like :meth:`generate`, on the caller's event loop: awaits the result, or with
        ``stream=True`` returns an async iterator of chunk dicts (``async for`` over it)."""
        reqs, batch = self._requests(prompt, sampling_params, input_ids, return_logprob,
                                     top_logprobs_num, logprob_start_len, stream, rid)
        if stream:
            if len(reqs) != 1:
                raise RequestError("stream=True takes a single prompt")
            return self._cumulative((await self._start(reqs))[0], reqs[0])
        return self._shape(await self._collect(reqs), batch)

    def encode(self, prompt: str | list[str] | None = None,
               input_ids: list[int] | list[list[int]] | None = None,
               pooling: str | None = None, normalize: bool | None = None
               ) -> Output | list[Output]:
        """Embed one prompt (returns a dict) or a batch (a list): ``{"embedding": [float],
        "meta_info": {"id", "prompt_tokens", "finish_reason"}}`` (SGLang's ``encode``
        shape). ``pooling``: ``last`` | ``mean`` (default ``--embedding-pooling``);
        ``normalize``: unit L2 norm (default: on unless ``--disable-embedding-normalize``).
        Raises :class:`RequestError` on invalid input, ``RuntimeError`` when the engine
        fails a request."""
        reqs, batch = _as_batch(prompt, input_ids)
        try:
            spec = EmbedSpec.of(pooling or self.server_args.embedding_pooling,
                                not self.server_args.disable_embedding_normalize
                                if normalize is None else normalize)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        for req in reqs:
            req.embed = spec
        future = asyncio.run_coroutine_threadsafe(self._embed(reqs), self._loop)
        results = future.result()
        return results if batch else results[0]

    async def _embed(self, reqs: list[GenerateRequest]) -> list[Output]:
        async def one(stream: RequestStream) -> Output:
            last = None
            async for out in stream:
                last = out
            if last is None or last.finish is None or last.embedding is None \
                    or last.finish.kind in (FinishKind.ERROR, FinishKind.ABORT):
                why = last.finish.message if last is not None and last.finish else None
                raise RuntimeError(f"request {stream.rid} failed: {why or 'no embedding'}")
            return {"embedding": last.embedding,
                    "meta_info": {"id": stream.rid, "prompt_tokens": last.usage.prompt_tokens,
                                  "finish_reason": last.finish.to_sglang()}}

        streams = await self._start(reqs)
        return list(await asyncio.gather(*(one(s) for s in streams)))

    def abort(self, rid: str) -> None:
        """Abort a running request by id (no-op when unknown)."""
        self.client.abort(rid)

    def get_stats(self) -> dict[str, Any]:
        """Scheduler and frontend statistics (see :meth:`EngineClient.get_stats`)."""
        return self.client.get_stats()

    def shutdown(self) -> None:
        """Stop the scheduler process and the background loop. Idempotent."""
        self.client.shutdown()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
