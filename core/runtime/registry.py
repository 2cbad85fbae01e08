"""The frontend's requests in flight: registration (with the queue limit, atomically), the
fan-out of ``n > 1`` choices, routing the scheduler's deltas to each caller, abort.

Threads: :meth:`RequestRegistry.dispatch` runs in the client's receiver thread; everything
else in callers' event-loop threads. One lock guards the table. Outputs are handed to each
caller's loop in one ``call_soon_threadsafe`` per loop per scheduler batch, not one per token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from heteroserve.core.runtime.admission import PreparedRequest
from heteroserve.core.runtime.errors import EngineDeadError, QueueFullError, RequestError
from heteroserve.core.runtime.io_struct import AbortRequest, OutputBatch, TokenizedRequest
from heteroserve.core.runtime.outputs import FinishKind, FinishReason, RequestOutput
from heteroserve.core.runtime.request_state import RequestState
from heteroserve.core.tokenizer import Tokenizer

Send = Callable[[object], None]
Item = RequestOutput | BaseException


@dataclass
class Counters:
    """Totals since start, read by the metrics endpoint."""

    num_requests_total: int = 0
    num_finished_total: int = 0
    num_aborted_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_tokens_total: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)


class RequestStream:
    """The outputs of one request (all its choices, interleaved as they come) on the event
    loop that registered it. Iterate with ``async for``; it ends after every choice's last
    output and raises :class:`EngineDeadError` if the engine dies first. Leaving early (or
    :meth:`aclose`) aborts the choices still running."""

    def __init__(self, registry: RequestRegistry, rid: str, rids: list[str],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.registry, self.rid, self.rids, self.loop = registry, rid, rids, loop
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._open = len(rids)

    @property
    def n(self) -> int:
        return len(self.rids)

    def deliver(self, items: list[Item]) -> None:
        for item in items:
            self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while self._open:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self._open = 0
                    raise item
                if item.finished:
                    self._open -= 1
                yield item
        finally:
            if self._open:
                self._open = 0
                self.registry.abort(self.rid, "request cancelled")

    async def aclose(self) -> None:
        """Abort what is still running (idempotent)."""
        if self._open:
            self._open = 0
            self.registry.abort(self.rid, "request cancelled")


class RequestRegistry:
    """See the module docstring. ``send`` delivers a message to the scheduler (raising
    :class:`EngineDeadError` when it cannot); ``max_queued`` bounds the requests registered
    that the scheduler has not started yet (None: no bound)."""

    def __init__(self, tokenizer: Tokenizer, send: Send, max_queued: int | None) -> None:
        self.tokenizer, self.send, self.max_queued = tokenizer, send, max_queued
        self.lock = threading.RLock()
        self.counters = Counters()
        self._states: dict[str, RequestState] = {}
        self._streams: dict[str, RequestStream] = {}  # sub-request rid -> its stream
        self._groups: dict[str, list[str]] = {}  # request rid -> its sub-request rids
        self._deferred: dict[str, list[tuple[RequestState, TokenizedRequest]]] = {}
        self._outbox: list[tuple[RequestStream, Item]] = []
        self._dead: str | None = None

    # -- registration ----------------------------------------------------------------------------
    def waiting(self) -> int:
        """Requests registered that the scheduler has not started (health checks excluded)."""
        return sum(1 for s in self._states.values() if not s.started and not s.health_check)

    def register(self, p: PreparedRequest) -> RequestStream:
        """Check the queue limit and register ``p``'s choices in one step, then send choice
        0 (the others follow once it has started, so they find the prompt in the prefix
        cache). Raises :class:`QueueFullError`, :class:`RequestError` (rid in use) or
        :class:`EngineDeadError`. Must be called on the event loop that iterates the
        stream."""
        rids = [p.rid] if p.n == 1 else [f"{p.rid}-{i}" for i in range(p.n)]
        with self.lock:
            if self._dead is not None:
                raise EngineDeadError(f"engine is dead: {self._dead}")
            if p.rid in self._groups or any(r in self._states for r in rids):
                raise RequestError(f"request id {p.rid!r} is already in use", param="rid")
            if not p.health_check and self.max_queued is not None and \
                    self.waiting() + p.n > self.max_queued:
                raise QueueFullError(f"too many queued requests ({self.waiting()} waiting, "
                                     f"--max-queued-requests {self.max_queued}); retry later")
            stream = RequestStream(self, p.rid, rids, asyncio.get_running_loop())
            states = []
            for i, rid in enumerate(rids):
                state = RequestState(rid=rid, index=i, prompt_ids=p.input_ids,
                                     tokenizer=self.tokenizer, options=p.options,
                                     sink=lambda out, s=stream: self._outbox.append((s, out)),
                                     health_check=p.health_check)
                states.append(state)
            msgs = [TokenizedRequest(rid, p.input_ids, p.sampling_params,
                                     p.options.return_logprob, p.options.top_logprobs_num,
                                     p.logprob_start_len, p.embed) for rid in rids]
            self._groups[p.rid] = rids
            for state in states:
                self._states[state.rid] = state
                self._streams[state.rid] = stream
            if len(states) > 1:
                self._deferred[rids[0]] = list(zip(states[1:], msgs[1:]))
            try:
                self._send_one(msgs[0])
            except EngineDeadError:
                self._forget(p.rid)
                raise
            return stream

    def _send_one(self, msg: TokenizedRequest) -> None:
        self.counters.num_requests_total += 1
        self.counters.prompt_tokens_total += len(msg.input_ids)
        self.send(msg)

    def _forget(self, rid: str) -> None:
        for sub in self._groups.pop(rid, []):
            self._states.pop(sub, None)
            self._streams.pop(sub, None)
            self._deferred.pop(sub, None)

    # -- outputs (receiver thread) -------------------------------------------------------------
    def dispatch(self, batch: OutputBatch) -> None:
        """Apply one scheduler batch: feed each delta to its request, retire finished ones,
        release deferred choices, and hand the outputs to their loops."""
        with self.lock:
            for step in batch.outputs:
                state = self._states.get(step.rid)
                if state is None:
                    continue  # finished here already (stop string, abort)
                before = state.num_output_tokens
                try:
                    stop_hit = state.on_output(step)
                except Exception as exc:  # one request's output handling, never the receiver
                    state.finish_with(FinishReason.error(f"output handling failed: {exc}"))
                    stop_hit = True
                self.counters.generation_tokens_total += state.num_output_tokens - before
                self._release_deferred(step.rid)
                if state.finished:
                    self._retire(state)
                    if stop_hit:
                        self._send_quietly(AbortRequest(state.rid))
        self._deliver()

    def _release_deferred(self, rid: str) -> None:
        for state, msg in self._deferred.pop(rid, []):
            if state.finished:
                continue
            try:
                self._send_one(msg)
            except EngineDeadError as exc:
                state.finish_with(FinishReason.error(str(exc)))
                self._retire(state)

    def _retire(self, state: RequestState) -> None:
        self._states.pop(state.rid, None)
        stream = self._streams.pop(state.rid, None)
        deferred = self._deferred.pop(state.rid, [])
        for other, _ in deferred:  # choice 0 ended before starting: the rest end with it
            if state.finish is not None:
                other.finish_with(state.finish)
            self._states.pop(other.rid, None)
            self._streams.pop(other.rid, None)
        if stream is not None and not any(r in self._states for r in stream.rids):
            self._groups.pop(stream.rid, None)
        c = self.counters
        if state.finish is not None:
            c.num_finished_total += 1
            c.cached_tokens_total += state.usage.cached_tokens
            kind = state.finish.kind.value
            c.finished_by_reason[kind] = c.finished_by_reason.get(kind, 0) + 1
            if state.finish.kind is FinishKind.ABORT:
                c.num_aborted_total += 1

    def _send_quietly(self, msg: object) -> None:
        try:
            self.send(msg)
        except EngineDeadError:
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self._outbox = self._outbox, []
        by_stream: dict[int, tuple[RequestStream, list[Item]]] = {}
        for stream, item in items:
            by_stream.setdefault(id(stream), (stream, []))[1].append(item)
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for stream, its in by_stream.values():
            by_loop.setdefault(id(stream.loop), (stream.loop, []))[1].append((stream, its))
        for loop, pairs in by_loop.values():
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(_deliver_all, pairs)

    # -- ending requests -----------------------------------------------------------------------
    def abort(self, rid: str, message: str = "aborted") -> None:
        """End request ``rid`` (all its choices) with an ``ABORT`` finish and stop it in the
        scheduler. Unknown rids are ignored. Thread-safe."""
        self.end(rid, FinishReason.abort(message))

    def end(self, rid: str, reason: FinishReason) -> None:
        """End request ``rid``'s unfinished choices with ``reason`` (abort or error)."""
        with self.lock:
            for sub in list(self._groups.get(rid, [rid])):
                state = self._states.get(sub)
                if state is None:
                    continue
                was_sent = sub not in {s.rid for group in self._deferred.values()
                                       for s, _ in group}
                state.finish_with(reason)
                self._retire(state)
                if was_sent and self._dead is None:
                    self._send_quietly(AbortRequest(sub))
        self._deliver()

    def reject(self, rid: str, message: str) -> None:
        """The scheduler refused sub-request ``rid``: its stream raises
        :class:`RequestError` and its other choices are aborted."""
        with self.lock:
            state, stream = self._states.get(rid), self._streams.get(rid)
            if state is None or stream is None:
                return
            state.finish = FinishReason.error(message)
            self._retire(state)
            self._outbox.append((stream, RequestError(message)))
            parent = stream.rid
        self._deliver()
        self.abort(parent, message)

    def end_all(self, reason: FinishReason) -> None:
        """End every request in flight with ``reason`` (server shutdown)."""
        with self.lock:
            rids = list(self._groups)
        for rid in rids:
            self.end(rid, reason)

    def fail_all(self, reason: str) -> None:
        """The engine is dead: every pending request's stream raises
        :class:`EngineDeadError`; later registrations are refused."""
        with self.lock:
            if self._dead is None:
                self._dead = reason
            for rid, state in list(self._states.items()):
                stream = self._streams.get(rid)
                if stream is not None and not state.finished:
                    state.finish = FinishReason.error(reason)
                    self._outbox.append((stream, EngineDeadError(reason)))
            self._states.clear()
            self._streams.clear()
            self._groups.clear()
            self._deferred.clear()
        self._deliver()

    @property
    def dead(self) -> str | None:
        return self._dead

    def num_inflight(self) -> int:
        with self.lock:
            return len(self._states)


def _deliver_all(pairs: list[tuple[RequestStream, list[Item]]]) -> None:
    for stream, items in pairs:
        stream.deliver(items)
