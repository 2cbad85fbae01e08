"""The engine client: lives in the caller's process (HTTP server or offline Engine) and
drives the scheduler processes.

It composes four parts, each in its own module: the :class:`Supervisor` (spawn, readiness,
watchdog, stop), the :class:`Channel` (one ZMQ + pickle pair), :class:`Admission` (validation,
tokenization and grammar compiles off the event loop) and the :class:`RequestRegistry`
(queue limit, fan-out, routing deltas to callers, abort).

A receiver thread reads the scheduler's messages and hands them to the registry; it doubles
as the watchdog: when a scheduler process dies, every pending request fails with
:class:`EngineDeadError` within a second and the death callbacks run.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from heteroserve.core.config import ServerArgs
from heteroserve.core.runtime.admission import Admission
from heteroserve.core.runtime.errors import EngineDeadError, one_line
from heteroserve.core.runtime.io_struct import (
    FlushCacheRequest, FlushCacheResult, GenerateRequest, Hello, OutputBatch, RequestFailed,
    SchedulerFatal, ShutdownRequest,
)
from heteroserve.core.runtime.outputs import FinishReason
from heteroserve.core.runtime.registry import RequestRegistry, RequestStream
from heteroserve.core.runtime.supervisor import Supervisor
from heteroserve.core.runtime.tensor_parallel import ranks_per_node, with_init_addr
from heteroserve.core.runtime.transport import Channel, TransportClosed
from heteroserve.core.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

WATCHDOG_POLL_MS = 250
DEFAULT_START_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_MS = 30_000


class EngineClient:
    """Start the scheduler processes for ``server_args`` and serve requests through them.

    The constructor blocks until every rank is ready (``start_timeout`` seconds at most) and
    raises ``RuntimeError`` with one line (the child's own error) when start-up fails.
    ``info`` holds what the scheduler resolved (platform, kernels, KV pool, context length).
    Call :meth:`shutdown` (an exit hook does it otherwise). ``scheduler_factory`` (importable,
    picklable) replaces how the scheduler process builds its scheduler, for tests.
    """

    def __init__(self, server_args: ServerArgs, start_timeout: float = DEFAULT_START_TIMEOUT_S,
                 scheduler_factory: Callable[..., Any] | None = None) -> None:
        if server_args.model_path is None:
            from heteroserve.core.models.tiny import ensure_default_model

            server_args = dataclasses.replace(server_args, model_path=str(ensure_default_model()))
        self.server_args = server_args = with_init_addr(server_args)
        tokenizer_path = server_args.tokenizer_path or server_args.model_path
        self.tokenizer = load_tokenizer(tokenizer_path, server_args.chat_template,
                                        server_args.trust_remote_code)
        self._closed = False
        self._send_lock = threading.Lock()
        self._death_callbacks: list[Callable[[str], None]] = []
        self._stats: dict[str, float] = {}
        self._health: asyncio.Future | None = None
        self._control_ids = itertools.count(1)
        self._control: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self.registry = RequestRegistry(self.tokenizer, self._send,
                                        server_args.max_queued_requests)
        self.channel, addresses = Channel.bind()
        self.supervisor = Supervisor(server_args, sorted(self.tokenizer.eos_token_ids),
                                     addresses, ranks_per_node(server_args), scheduler_factory)
        atexit.register(self.shutdown)
        try:
            self.info = self.supervisor.wait_ready(start_timeout)
            self.channel.send_when_connected(Hello(), CONNECT_TIMEOUT_MS)
        except BaseException:
            self.shutdown()
            raise
        self.admission = Admission(self.tokenizer, self.info, server_args, tokenizer_path)
        self._receiver = threading.Thread(target=self._receive_loop, name="heteroserve-frontend",
                                          daemon=True)
        self._receiver.start()

    # -- receiving (the receiver thread) -----------------------------------------------------
    def _receive_loop(self) -> None:
        while not self._closed:
            try:
                msg = self.channel.recv(WATCHDOG_POLL_MS)
            except Exception as exc:  # a closed socket at shutdown, or an unreadable message
                if self._closed:
                    return
                logger.error("cannot read a message from the scheduler: %s", one_line(exc))
                continue
            if msg is None:
                dead = self.supervisor.dead_rank()
                if dead is not None and not self._closed:
                    self._die(f"scheduler process tp{dead} died (exit code "
                              f"{self.supervisor.exit_code(dead)})")
                    return
                continue
            try:
                self._handle(msg)
            except Exception:  # the receiver must outlive any one bad message
                logger.exception("cannot handle a message from the scheduler")

    def _handle(self, msg: object) -> None:
        if isinstance(msg, OutputBatch):
            if msg.stats is not None:
                self._stats = msg.stats
            self.registry.dispatch(msg)
        elif isinstance(msg, RequestFailed):
            self.registry.reject(msg.rid, msg.message)
        elif isinstance(msg, FlushCacheResult):
            self._resolve_control(msg.req_id, msg)
        elif isinstance(msg, SchedulerFatal):
            self._die(msg.message)

    def _die(self, reason: str, expected: bool = False) -> None:
        if self.registry.dead is not None:
            return
        if not expected:
            logger.error("engine is dead: %s", reason)
            self.supervisor.kill()  # ranks wait on each other forever
        self.registry.fail_all(reason)
        for req_id in list(self._control):
            self._resolve_control(req_id, EngineDeadError(reason))
        if not expected:
            for callback in list(self._death_callbacks):
                try:
                    callback(reason)
                except Exception:
                    logger.exception("engine-death callback failed")

    # -- sending -------------------------------------------------------------------------------
    def _send(self, msg: object) -> None:
        with self._send_lock:
            if self._closed:
                raise EngineDeadError("engine is shut down")
            try:
                self.channel.send(msg)
            except TransportClosed:
                raise EngineDeadError("the engine is not accepting requests "
                                      "(its process is gone or stuck)") from None

    # -- public API ----------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> RequestStream:
        """Admit ``req`` (validate, tokenize, compile its grammar, off the event loop) and
        register it; returns the stream of its :class:`RequestOutput` deltas. Raises
        :class:`RequestError` (invalid), :class:`QueueFullError` or :class:`EngineDeadError`
        before anything is sent."""
        self._check_alive()
        prepared = await self.admission.prepare(req)
        self._check_alive()
        return self.registry.register(prepared)

    def _check_alive(self) -> None:
        if self._closed:
            raise EngineDeadError("engine is shut down")
        dead = self.registry.dead
        if dead:
            raise EngineDeadError(f"engine is dead: {dead}")

    def abort(self, rid: str) -> None:
        """Abort request ``rid`` (all its choices); unknown rids are ignored. Thread-safe."""
        self.registry.abort(rid)

    async def flush_cache(self, timeout: float = 30.0) -> FlushCacheResult:
        """Ask the scheduler to empty its radix prefix cache; returns its answer (``flushed``
        is False while requests run). Raises ``EngineDeadError`` or ``TimeoutError``."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        req_id = next(self._control_ids)
        future: asyncio.Future = loop.create_future()
        self._control[req_id] = (loop, future)
        try:
            self._send(FlushCacheRequest(req_id))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._control.pop(req_id, None)

    def _resolve_control(self, req_id: int, result: FlushCacheResult | Exception) -> None:
        """Complete the control call ``req_id`` (from the receiver thread)."""
        pending = self._control.pop(req_id, None)
        if pending is None:
            return
        loop, future = pending

        def complete() -> None:
            if future.done():
                return
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

        try:
            loop.call_soon_threadsafe(complete)
        except RuntimeError:  # the caller's loop is closed: nobody waits any more
            pass

    def end_all(self, reason: FinishReason) -> None:
        """End every request in flight with ``reason`` (the server's shutdown)."""
        self.registry.end_all(reason)

    def on_death(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` (from the receiver thread) if the engine dies."""
        self._death_callbacks.append(callback)

    def get_stats(self) -> dict[str, Any]:
        """The scheduler's latest stats snapshot (``num_running``, ``num_waiting``,
        ``kv_usage``, ``cache_hit_rate``, page counts... see ``Scheduler.get_stats``;
        refreshed a few times a second while busy and once when it goes idle) plus
        ``kv_used_tokens`` (held by requests), ``kv_evictable_tokens`` /
        ``kv_cached_tokens`` (the prefix cache's unlocked / all slots), the frontend's
        counters, ``num_inflight``, ``num_queued_frontend`` and ``max_total_tokens``."""
        out: dict[str, Any] = dict(self._stats)
        page = self.info.page_size
        for pages, tokens in (("kv_request_pages", "kv_used_tokens"),
                              ("kv_evictable_pages", "kv_evictable_tokens"),
                              ("kv_cached_pages", "kv_cached_tokens")):
            if isinstance(out.get(pages), (int, float)):
                out[tokens] = int(out[pages]) * page
        with self.registry.lock:
            counters = dataclasses.asdict(self.registry.counters)
            out["num_queued_frontend"] = self.registry.waiting()
        out.update(counters)
        out["num_inflight"] = self.registry.num_inflight()
        out["max_total_tokens"] = self.info.max_total_tokens
        return out

    def is_alive(self) -> bool:
        """True while the scheduler processes run and none reported a fatal error."""
        return (not self._closed and self.registry.dead is None
                and self.supervisor.dead_rank() is None)

    async def health_generate(self, timeout: float = 30.0) -> bool:
        """Generate one token end to end; returns True, or raises ``EngineDeadError`` (or
        ``TimeoutError``). Concurrent calls share one probe (so probes cannot pile up); the
        probe is marked as a health check and skips the queue limit."""
        self._check_alive()
        if self._health is None or self._health.done():
            self._health = asyncio.ensure_future(self._probe())
        await asyncio.wait_for(asyncio.shield(self._health), timeout)
        return True

    async def _probe(self) -> None:
        first = next(iter(sorted(self.tokenizer.eos_token_ids)), 0) or 1
        stream = await self.generate(GenerateRequest(
            input_ids=[first], sampling_params={"max_new_tokens": 1, "temperature": 0.0},
            health_check=True))
        async for _ in stream:
            pass

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the scheduler processes (gracefully, then terminate, then kill), fail pending
        requests, release the sockets and workers. Idempotent."""
        with self._send_lock:
            if self._closed:
                return
            try:
                self.channel.send(ShutdownRequest())
            except TransportClosed:
                pass
            self._closed = True
        self._die("engine shut down", expected=True)
        self.supervisor.stop(timeout)
        receiver = getattr(self, "_receiver", None)
        if receiver is not None and receiver is not threading.current_thread():
            receiver.join(2)
        self.channel.close()
        admission = getattr(self, "admission", None)
        if admission is not None:
            admission.shutdown()
        atexit.unregister(self.shutdown)
