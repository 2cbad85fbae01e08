"""Compile grammars off the event loop in worker processes that can be stopped.

The frontend compiles (so an invalid grammar is a 400 before the request runs) and ships the
serialised grammar to the engine process, where :mod:`heteroserve.core.grammar.matcher`
rebuilds it in well under a millisecond.

Every compile runs in a ``compile_worker`` process, one compile per worker at a time. A
compile that passes its time limit, or a worker whose resident memory passes
``max_worker_rss`` (checked every 50 ms), is killed: its memory goes back to the system at
once and a fresh worker replaces it. Limits: a spec's text size (``max_spec_bytes``), the
number of compiles waiting for a worker (``max_pending``), and the cache's total size
(``cache_bytes``, LRU by serialised size).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from heteroserve.core.grammar.compile_worker import read_message, write_message
from heteroserve.core.grammar.spec import GrammarError, GrammarSpec

logger = logging.getLogger(__name__)

WORKER_MODULE = "heteroserve.core.grammar.compile_worker"
WORKER_START_TIMEOUT_S = 120.0
RSS_POLL_S = 0.05


class GrammarBusyError(GrammarError):
    """Too many grammars are waiting to compile; retry later."""


@dataclass(frozen=True)
class CompileLimits:
    """``timeout``: seconds one compile may take; ``max_spec_bytes``: the largest schema,
    regex or grammar text; ``max_worker_rss``: bytes a worker may hold while compiling;
    ``cache_bytes``: the cache's total size; ``max_pending``: compiles queued for a worker."""

    timeout: float = 10.0
    max_spec_bytes: int = 256 * 1024
    max_worker_rss: int = 2 * 1024 ** 3
    cache_bytes: int = 64 * 1024 ** 2
    max_pending: int = 64


@dataclass
class _Job:
    spec: GrammarSpec
    future: concurrent.futures.Future


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Worker(threading.Thread):
    """Owns one worker process: feeds it jobs, enforces the limits, replaces it when killed."""

    def __init__(self, pool: GrammarCompilePool, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.proc: subprocess.Popen | None = None
        #: set once a prestart attempt ended (its process ready, or the failure logged)
        self.prestarted = threading.Event()

    def _start_process(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, start_new_session=True)
        self.proc = proc  # visible to the pool's shutdown while it starts
        assert proc.stdin is not None and proc.stdout is not None
        write_message(proc.stdin, (self.pool.tokenizer_path, self.pool.vocab_size,
                                   self.pool.trust_remote_code))
        if not self._wait_readable(proc, time.monotonic() + WORKER_START_TIMEOUT_S, 0):
            proc.kill()
            raise GrammarError("the grammar compiler did not start")
        kind, _ = read_message(proc.stdout)
        if kind != "ready":
            proc.kill()
            raise GrammarError("the grammar compiler failed to start")
        return proc

    @staticmethod
    def _wait_readable(proc: subprocess.Popen, deadline: float, max_rss: int) -> bool:
        """True when the worker has a reply; False at the deadline, over ``max_rss`` (when
        non-zero) or when it exited."""
        assert proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                return False
            readable, _, _ = select.select([proc.stdout], [], [], min(left, RSS_POLL_S))
            if readable:
                return True
            if max_rss and _rss_bytes(proc.pid) > max_rss:
                return False

    def run(self) -> None:
        if self.pool.prestart:
            self._prestart()
        while True:
            job = self.pool.jobs.get()
            if job is None:
                break
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(self._compile(job.spec))
            except Exception as exc:
                job.future.set_exception(exc)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def _prestart(self) -> None:
        """Start the process before any job; a failure is logged and retried by the first
        compile."""
        try:
            self.proc = self._start_process()
        except (GrammarError, OSError, EOFError) as exc:
            logger.warning("grammar compiler %s did not start (%s); the first structured-"
                           "output request tries again", self.name, exc)
            self.proc = None
        finally:
            self.prestarted.set()

    def _compile(self, spec: GrammarSpec) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start_process()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        limits = self.pool.limits
        write_message(proc.stdin, spec)
        started = time.monotonic()
        if not self._wait_readable(proc, started + limits.timeout, limits.max_worker_rss):
            rss = _rss_bytes(proc.pid)
            proc.kill()
            proc.wait()
            self.proc = None
            if time.monotonic() - started >= limits.timeout:
                raise GrammarError(f"{spec.kind} took longer than {limits.timeout:g}s to "
                                   "compile; simplify it")
            raise GrammarError(f"{spec.kind} needs more than {limits.max_worker_rss >> 20} MiB "
                               f"to compile (reached {rss >> 20} MiB); simplify it")
        kind, payload = read_message(proc.stdout)
        if kind != "ok":
            raise GrammarError(payload)
        return payload


class GrammarCompilePool:
    """Compiles :class:`GrammarSpec` objects to serialised xgrammar grammars (see the module
    docstring). Workers start on first use or at :meth:`start`; with ``prestart`` each starts
    its process as it starts (a process takes seconds: importing xgrammar and building the
    tokenizer's vocabulary table), else at its first compile. Thread-safe; :meth:`compile` is
    a coroutine on the caller's event loop."""

    def __init__(self, tokenizer_path: str, vocab_size: int, limits: CompileLimits,
                 workers: int = 2, trust_remote_code: bool = False,
                 prestart: bool = False) -> None:
        self.tokenizer_path, self.vocab_size, self.limits = tokenizer_path, vocab_size, limits
        self.prestart = prestart
        self.trust_remote_code = trust_remote_code  # --trust-remote-code, for the tokenizer
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._cache: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._cache_size = 0
        self._lock = threading.Lock()
        self._workers = [_Worker(self, f"grammar-worker-{i}") for i in range(workers)]
        self._started = False

    def _cached(self, spec: GrammarSpec) -> str | None:
        with self._lock:
            text = self._cache.get(spec)
            if text is not None:
                self._cache.move_to_end(spec)
            return text

    def _remember(self, spec: GrammarSpec, text: str) -> None:
        size = len(text) + len(spec.text)
        if size > self.limits.cache_bytes // 4:
            return
        with self._lock:
            if spec in self._cache:
                return
            self._cache[spec] = text
            self._cache_size += size
            while self._cache_size > self.limits.cache_bytes:
                old, old_text = self._cache.popitem(last=False)
                self._cache_size -= len(old_text) + len(old.text)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache holds now (serialised grammars plus their spec texts)."""
        return self._cache_size

    def submit(self, spec: GrammarSpec) -> concurrent.futures.Future:
        """Queue ``spec``; the future holds the serialised grammar or a :class:`GrammarError`.
        Raises :class:`GrammarError` at once for a spec over the size limit, and
        :class:`GrammarBusyError` when too many compiles are waiting."""
        if len(spec.text.encode("utf-8", "surrogatepass")) > self.limits.max_spec_bytes:
            raise GrammarError(f"{spec.kind} is larger than {self.limits.max_spec_bytes} bytes")
        future: concurrent.futures.Future = concurrent.futures.Future()
        cached = self._cached(spec)
        if cached is not None:
            future.set_result(cached)
            return future
        if self.jobs.qsize() >= self.limits.max_pending:
            raise GrammarBusyError("too many grammars are waiting to compile; retry later")
        self.start()
        self.jobs.put(_Job(spec, future))
        future.add_done_callback(lambda f: None if f.exception() else
                                 self._remember(spec, f.result()))
        return future

    def start(self) -> None:
        """Start the worker threads (idempotent; returns at once: a process starts in its
        worker's thread)."""
        with self._lock:
            if not self._started:
                self._started = True
                for worker in self._workers:
                    worker.start()

    async def compile(self, spec: GrammarSpec) -> str:
        """The serialised grammar for ``spec``, awaited without blocking the loop. Raises
        :class:`GrammarError` (invalid, too large, too slow, too much memory, busy)."""
        return await asyncio.wrap_future(self.submit(spec))

    def shutdown(self) -> None:
        """Stop the workers (killing any compile in progress), wait for their threads, and
        reap their processes, a process still starting included. Compiles still queued are
        cancelled."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        for worker in self._workers:
            self.jobs.put(None)
        for worker in self._workers:
            if worker.proc is not None:
                worker.proc.kill()
        for worker in self._workers:
            if worker.is_alive():
                worker.join(5)
            proc = worker.proc
            if proc is not None:
                proc.kill()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    logger.warning("grammar worker %d did not exit", proc.pid)
