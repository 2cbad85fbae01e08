"""The engine client: lives in the caller's process (HTTP server or offline Engine), owns the
tokenizer and the detokenizers, and talks to the scheduler process over ZMQ.

Threads: a receiver thread reads the scheduler's outputs, detokenizes them and posts
per-request items to the asyncio loop that started each request (so any number of loops may
use one client). It doubles as the watchdog: when the scheduler process dies, every pending
request fails with :class:`EngineDeadError` instead of hanging.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq

from heteroserve.core.config import ServerArgs
from heteroserve.core.runtime.errors import EngineDeadError, QueueFullError, RequestError
from heteroserve.core.runtime.io_struct import (
    AbortRequest, GenerateRequest, OutputBatch, ReadyInfo, RequestFailed, SchedulerFatal,
    ShutdownRequest, TokenizedRequest,
)
from heteroserve.core.runtime.request_state import RequestState
from heteroserve.core.runtime.request_validation import PreparedRequest, prepare_request
from heteroserve.core.runtime.scheduler_process import run_scheduler_process
from heteroserve.core.runtime.tensor_parallel import ranks_per_node, with_init_addr
from heteroserve.core.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

HEALTH_RID_PREFIX = "HEALTH_CHECK_"


class EngineClient:
    """Start a scheduler process for ``server_args`` and serve generate calls through it.

    The constructor blocks until the scheduler is ready (``start_timeout`` seconds at most) and
    raises ``RuntimeError`` with one line when start-up fails. ``info`` holds what the
    scheduler resolved (platform, kernels, KV pool, context length). Call :meth:`shutdown`
    (or rely on the exit hook) to stop the process. ``scheduler_factory`` replaces how the
    scheduler process builds its scheduler (see :func:`run_scheduler_process`).
    """

    def __init__(self, server_args: ServerArgs, start_timeout: float = 900.0,
                 scheduler_factory: Callable[..., Any] | None = None) -> None:
        if server_args.model_path is None:
            from heteroserve.core.models.tiny import ensure_default_model

            server_args = dataclasses.replace(server_args, model_path=str(ensure_default_model()))
        self.server_args = server_args
        self.tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path)
        self._lock = threading.RLock()
        self._states: dict[str, RequestState] = {}
        self._children: dict[str, list[str]] = {}  # parent rid -> sub-request rids (n > 1)
        self._dead: str | None = None
        self._stats: dict[str, Any] = {}
        self._counters = {"num_requests_total": 0, "num_finished_total": 0,
                          "num_aborted_total": 0, "prompt_tokens_total": 0,
                          "generation_tokens_total": 0, "cached_tokens_total": 0}
        self._closed = False
        self._grammars: Any = None  # GrammarCompileService, built on first use
        self._ipc_dir = tempfile.mkdtemp(prefix="heteroserve-")
        in_addr = f"ipc://{self._ipc_dir}/to_scheduler"
        out_addr = f"ipc://{self._ipc_dir}/from_scheduler"
        self._zmq = zmq.Context()
        self._send_sock = self._zmq.socket(zmq.PUSH)
        self._send_sock.setsockopt(zmq.LINGER, 0)
        self._send_sock.setsockopt(zmq.SNDHWM, 0)  # never block the caller's event loop
        self._send_sock.bind(in_addr)
        self._recv_sock = self._zmq.socket(zmq.PULL)
        self._recv_sock.setsockopt(zmq.LINGER, 0)
        self._recv_sock.bind(out_addr)
        ctx = mp.get_context("spawn")
        server_args = with_init_addr(server_args)
        self.server_args = server_args
        self._procs: list[Any] = []
        readers = []
        for local_rank in range(ranks_per_node(server_args)):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=run_scheduler_process, name=f"heteroserve-scheduler-tp{local_rank}",
                daemon=True,
                args=(server_args, sorted(self.tokenizer.eos_token_ids), in_addr, out_addr,
                      writer, os.getpid()),
                kwargs={"tp_rank": local_rank, "factory": scheduler_factory})
            proc.start()
            writer.close()
            self._procs.append(proc)
            readers.append(reader)
        atexit.register(self.shutdown)
        try:
            infos = [self._wait_ready(r, start_timeout) for r in readers]
            self.info: ReadyInfo = infos[0]
        except BaseException:
            self.shutdown()
            raise
        finally:
            for r in readers:
                r.close()
        self._receiver = threading.Thread(target=self._receive_loop, name="heteroserve-frontend",
                                          daemon=True)
        self._receiver.start()

    def _wait_ready(self, reader: Any, timeout: float) -> ReadyInfo:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if reader.poll(0.2):
                try:
                    kind, payload = reader.recv()
                except EOFError:
                    break
                if kind == "ready":
                    return payload
                raise RuntimeError(f"engine start-up failed: {payload}")
            dead = self._dead_rank()
            if dead is not None:
                break
        dead = self._dead_rank()
        if dead is None:
            raise RuntimeError(f"engine start-up timed out after {timeout:.0f}s")
        raise RuntimeError(f"engine start-up failed: scheduler process tp{dead} exited with "
                           f"code {self._procs[dead].exitcode} (see its log above)")

    def _dead_rank(self) -> int | None:
        """The first local rank whose process has exited, or None."""
        return next((i for i, p in enumerate(self._procs) if not p.is_alive()), None)

    # -- receiving (runs in the receiver thread) ----------------------------------------------

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._recv_sock, zmq.POLLIN)
        while not self._closed:
            try:
                ready = poller.poll(500)
            except zmq.ZMQError:
                break
            if not ready:
                dead = self._dead_rank()
                if dead is not None and not self._closed:
                    self._die(f"scheduler process tp{dead} died (exit code "
                              f"{self._procs[dead].exitcode})")
                    return
                continue
            try:
                data = self._recv_sock.recv()
            except zmq.ZMQError:
                break
            try:
                msg = pickle.loads(data)
                with self._lock:
                    self._dispatch(msg)
            except Exception:  # the receiver must outlive any one bad message
                logger.exception("cannot handle a message from the scheduler")

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, OutputBatch):
            if msg.stats is not None:
                self._stats = msg.stats
            for view in msg.outputs:
                state = self._states.get(view.rid)
                if state is None:
                    continue  # finished here already (stop string, abort)
                before = len(state.output_ids)
                try:
                    stop_hit = state.on_output(view)
                except Exception as exc:  # never let one request kill the receiver
                    logger.exception("request %s: output handling failed", view.rid)
                    state.fail(RuntimeError(f"output handling failed: {exc}"))
                    stop_hit = True
                self._counters["generation_tokens_total"] += len(state.output_ids) - before
                if state.finished:
                    self._retire(state)
                    if stop_hit:
                        self._send(AbortRequest(state.rid))
        elif isinstance(msg, RequestFailed):
            state = self._states.get(msg.rid)
            if state is not None:
                state.fail(RequestError(msg.message))
                self._retire(state)
        elif isinstance(msg, SchedulerFatal):
            self._die(msg.message)

    def _retire(self, state: RequestState) -> None:
        self._states.pop(state.rid, None)
        if state.finish_reason is not None:
            self._counters["num_finished_total"] += 1
            self._counters["cached_tokens_total"] += state.cached_tokens
            if state.finish_reason.get("type") == "abort":
                self._counters["num_aborted_total"] += 1

    def _die(self, reason: str, expected: bool = False) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
                if not expected:
                    logger.error("engine is dead: %s", reason)
                    for p in getattr(self, "_procs", []):  # ranks wait on each other forever
                        if p.is_alive():
                            p.kill()
            for state in list(self._states.values()):
                state.fail(EngineDeadError(reason))
            self._states.clear()

    # -- sending -------------------------------------------------------------------------------

    def _send(self, msg: Any) -> None:
        with self._lock:
            if self._closed:
                return
            try:  # never block the caller's event loop on a dead engine
                self._send_sock.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL),
                                     zmq.NOBLOCK)
            except zmq.Again:
                raise EngineDeadError("the engine is not accepting requests "
                                      "(its process is gone or stuck)") from None

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("engine is shut down")
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead}")

    # -- public API ------------------------------------------------------------------------------

    def generate(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        """Validate ``req`` now and return an async iterator over its outputs.

        Raises :class:`RequestError` (invalid request), :class:`QueueFullError` or
        :class:`EngineDeadError` immediately, before anything is sent. The request is sent
        when iteration starts. Each yielded dict is SGLang-shaped (``text``, ``output_ids``,
        ``meta_info``) plus ``index`` (the choice, 0..n-1). With ``stream=False`` each choice
        yields exactly one final dict; with ``stream=True`` cumulative chunks then the final
        one. Closing the iterator early aborts the request. With ``n > 1`` the choices are
        interleaved as they arrive (sub-request rids ``{rid}-{i}``). Must be called from the
        thread running the event loop that iterates it.
        """
        self._check_alive()
        prepared = prepare_request(req, self.tokenizer, self.info, self._compile_grammar)
        if prepared.rid in self._states or prepared.rid in self._children:
            raise RequestError(f"request id {prepared.rid!r} is already in use")
        if not prepared.rid.startswith(HEALTH_RID_PREFIX):
            self._check_queue(prepared.n)
        return self._run(prepared, asyncio.get_running_loop())

    def _compile_grammar(self, spec: Any) -> str:
        """Compile a grammar spec (cached; blocks up to ``--grammar-compile-timeout``, so an
        invalid grammar is refused before the request is sent). Raises ``GrammarError``."""
        with self._lock:
            if self._grammars is None:
                from heteroserve.core.grammar.compiler import GrammarCompileService

                self._grammars = GrammarCompileService(self.tokenizer.hf,
                                                       self.info.extra["vocab_size"])
        return self._grammars.compile(spec, self.server_args.grammar_compile_timeout)

    def _check_queue(self, n: int) -> None:
        limit = self.server_args.max_queued_requests
        if limit is None:
            return
        with self._lock:
            waiting = sum(1 for s in self._states.values() if s.first_token_time is None)
        if waiting + n > limit:
            raise QueueFullError(f"too many queued requests ({waiting} waiting, "
                                 f"--max-queued-requests {limit}); retry later")

    async def _run(self, p: PreparedRequest, loop: asyncio.AbstractEventLoop
                   ) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue = asyncio.Queue()

        def sink(item: tuple[str, int, Any]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        rids = [p.rid] if p.n == 1 else [f"{p.rid}-{i}" for i in range(p.n)]
        states = [RequestState(
            rid=rid, index=i, prompt_ids=p.input_ids, tokenizer=self.tokenizer, stop=p.stop,
            skip_special_tokens=p.skip_special_tokens, stream=p.stream,
            stream_interval=max(1, self.server_args.stream_interval),
            return_logprob=p.return_logprob, top_logprobs_num=p.top_logprobs_num, sink=sink,
            no_stop_trim=p.no_stop_trim)
            for i, rid in enumerate(rids)]
        if p.n > 1:
            # the first choice prefills the prompt; the rest are sent once it has produced
            # output, so they find the prompt in the radix cache
            states[0].on_first_output = lambda: sink(("prefilled", 0, None))
        pending = set(range(p.n))
        rest_sent = p.n == 1
        try:
            with self._lock:
                self._check_alive()
                for rid in rids:
                    if rid in self._states:
                        raise RequestError(f"request id {rid!r} is already in use")
                if p.n > 1:
                    self._children[p.rid] = rids
                self._register_and_send(states[0], p)
            while pending:
                kind, index, payload = await queue.get()
                if kind == "prefilled":
                    with self._lock:
                        self._check_alive()
                        for state in states[1:]:
                            self._register_and_send(state, p)
                    rest_sent = True
                    continue
                if kind == "final" and not rest_sent:  # choice 0 aborted before its prefill
                    for state in states[1:]:
                        state.finish(payload["meta_info"]["finish_reason"])
                    rest_sent = True
                if kind == "error":
                    raise payload
                if kind == "final":
                    pending.discard(index)
                yield payload
        finally:
            self._children.pop(p.rid, None)
            unfinished = [s for s in states if not s.finished and s.rid in self._states]
            for state in unfinished:
                self._abort_state(state, "request cancelled")

    def _register_and_send(self, state: RequestState, p: PreparedRequest) -> None:
        self._states[state.rid] = state
        self._counters["num_requests_total"] += 1
        self._counters["prompt_tokens_total"] += len(p.input_ids)
        self._send(TokenizedRequest(state.rid, p.input_ids, p.sampling_params, p.return_logprob,
                                    p.top_logprobs_num, p.logprob_start_len))

    def _abort_state(self, state: RequestState, message: str) -> None:
        with self._lock:
            if self._states.pop(state.rid, None) is None:
                return
            state.finish({"type": "abort", "message": message})
            self._retire(state)
            if self._dead is None:
                self._send(AbortRequest(state.rid))

    def abort(self, rid: str) -> None:
        """Abort request ``rid`` (all its choices when it was sent with ``n > 1``); its
        iterator ends with finish_reason ``{"type": "abort", ...}``. Unknown rids are ignored.
        Thread-safe."""
        with self._lock:
            rids = self._children.get(rid, [rid])
            for r in rids:
                state = self._states.get(r)
                if state is not None:
                    self._abort_state(state, "aborted")

    def get_stats(self) -> dict[str, Any]:
        """The scheduler's latest stats snapshot (``num_running``, ``num_waiting``,
        ``kv_usage``, ``cache_hit_rate``, page counts... refreshed a few times a second while
        busy and once when it goes idle) plus ``kv_used_tokens`` / ``kv_cached_tokens``
        (request-held and cache-only KV slots), the frontend's counters
        (``num_requests_total``, ``num_finished_total``, ``num_aborted_total``,
        ``prompt_tokens_total``, ``generation_tokens_total``, ``cached_tokens_total``),
        ``num_inflight`` and ``max_total_tokens``."""
        with self._lock:
            out = dict(self._stats)
            page = self.info.page_size
            for pages, tokens in (("kv_request_pages", "kv_used_tokens"),
                                  ("kv_cached_pages", "kv_cached_tokens")):
                if isinstance(out.get(pages), int):
                    out[tokens] = out[pages] * page
            out.update(self._counters)
            out["num_inflight"] = len(self._states)
            out["max_total_tokens"] = self.info.max_total_tokens
        return out

    def is_alive(self) -> bool:
        """True while the scheduler process runs and has not reported a fatal error."""
        return not self._closed and self._dead is None and self._dead_rank() is None

    async def health_generate(self, timeout: float = 30.0) -> bool:
        """Generate one token end to end; returns True, or raises ``EngineDeadError`` (or
        ``TimeoutError``) when the engine cannot."""
        self._check_alive()
        req = GenerateRequest(input_ids=[next(iter(self.tokenizer.eos_token_ids), 0) or 1],
                              sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                              rid=f"{HEALTH_RID_PREFIX}{uuid.uuid4().hex}")

        async def one() -> None:
            async for _ in self.generate(req):
                pass

        await asyncio.wait_for(one(), timeout)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the scheduler process (gracefully, then terminate, then kill), fail pending
        requests, release sockets. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._send_sock.send(pickle.dumps(ShutdownRequest()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._closed = True
        self._die("engine shut down", expected=True)
        for proc in getattr(self, "_procs", []):  # rank 0 forwards the shutdown to the others
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        receiver = getattr(self, "_receiver", None)
        if receiver is not None and receiver is not threading.current_thread():
            receiver.join(2)
        self._send_sock.close()
        self._recv_sock.close()
        self._zmq.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
        if self._grammars is not None:
            self._grammars.shutdown()
        atexit.unregister(self.shutdown)
