"""The scheduler process: builds the model runner and the scheduler, then serves requests.

One process per tensor-parallel rank (``tp_rank``), started by
:class:`~heteroserve.core.runtime.supervisor.Supervisor`. Rank 0 talks to the frontend over
the :class:`~heteroserve.core.runtime.transport.Channel` pair: it receives
:class:`TokenizedRequest`, :class:`AbortRequest`, :class:`FlushCacheRequest`,
:class:`ShutdownRequest` and sends :class:`OutputBatch`, :class:`RequestFailed`,
:class:`FlushCacheResult`, :class:`SchedulerFatal`. Other ranks follow rank
0 in lockstep.

Start-up writes exactly one pickled message to the launch spec's ready pipe:
``("ready", ReadyInfo)`` or ``("error", one-line message)``.

ZMQ I/O stays off the step loop's critical path: a receiver thread unpickles incoming messages
into a queue and a sender thread pickles and pushes outputs, so while the device computes
step N (torch releases the GIL) new requests are received and step N-1's outputs are sent.
Where ``--cpu-threads`` binds the compute threads to a core list, both I/O threads run on the
cores it left free (:func:`io_thread_cores`), with ZMQ's I/O thread, not on a core an
intra-op worker needs.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import threading
import time
from typing import Any

import torch
import zmq

from heteroserve.core.config import ServerArgs
from heteroserve.core.runtime.errors import one_line
from heteroserve.core.runtime.host_threads import HostThreads, pin_current_thread
from heteroserve.core.runtime.io_struct import (
    AbortRequest, FlushCacheRequest, FlushCacheResult, Hello, OutputBatch, ReadyInfo,
    RequestFailed, SchedulerFatal, ShutdownRequest, TokenizedRequest,
)
from heteroserve.core.runtime.supervisor import LaunchSpec
from heteroserve.core.runtime.throughput_log import ThroughputLog
from heteroserve.core.runtime.transport import Channel

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how long an idle loop blocks waiting for a request
STATS_INTERVAL_S = 0.25  # a stats snapshot rides along with outputs at least this often
_STOP = object()


class _Receiver(threading.Thread):
    """Reads messages from the channel into ``inbox`` until told to stop."""

    def __init__(self, channel: Channel, inbox: queue.Queue, cores: tuple[int, ...] = ()) -> None:
        super().__init__(name="heteroserve-recv", daemon=True)
        self.channel = channel
        self.inbox = inbox
        self.cores = cores
        self.stopping = threading.Event()

    def run(self) -> None:
        pin_current_thread(self.cores)
        while not self.stopping.is_set():
            try:
                msg = self.channel.recv(200)
            except zmq.ZMQError:
                break
            except Exception as exc:  # an unreadable message must not kill the receiver
                logger.error("dropping an unreadable message: %s", one_line(exc))
                continue
            if msg is not None:
                self.inbox.put(msg)


class _Sender(threading.Thread):
    """Sends everything put in ``outbox`` (``_STOP`` ends it after a flush)."""

    def __init__(self, channel: Channel, cores: tuple[int, ...] = ()) -> None:
        super().__init__(name="heteroserve-send", daemon=True)
        self.channel = channel
        self.cores = cores
        self.outbox: queue.Queue = queue.Queue()

    def run(self) -> None:
        pin_current_thread(self.cores)
        while True:
            item = self.outbox.get()
            if item is _STOP:
                break
            try:
                self.channel.send(item)
            except Exception as exc:
                logger.error("cannot send %s: %s", type(item).__name__, one_line(exc))


def io_thread_cores(scheduler: Any) -> tuple[int, ...]:
    """Where the sender and receiver threads run: the cores ``--cpu-threads`` left free when
    it bound the compute threads (empty: wherever the OS puts them)."""
    threads = getattr(getattr(scheduler, "runner", None), "host_threads", None)
    return threads.spare_cores if isinstance(threads, HostThreads) else ()


def _ready_info(platform: Any, dispatch: Any, model_runner: Any, scheduler: Any,
                page_size: int) -> ReadyInfo:
    return ReadyInfo(
        platform=platform.name, device=str(model_runner.device), kernels=dispatch.summary(),
        max_total_tokens=int(scheduler.max_total_tokens), page_size=page_size,
        max_context_len=int(scheduler.max_context_len),
        max_running_requests=int(scheduler.max_running_requests),
        vocab_size=int(model_runner.vocab_size), pid=os.getpid(),
        hidden_size=int(getattr(model_runner, "hidden_size", 0)))


def _make_req(msg: TokenizedRequest) -> Any:
    from heteroserve.core.scheduler import Req

    return Req(rid=msg.rid, input_ids=list(msg.input_ids), sampling_params=msg.sampling_params,
               return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
               logprob_start_len=msg.logprob_start_len, embed=msg.embed)


class SchedulerLoop:
    """The event loop of one scheduler process (see the module docstring). ``log_stats``:
    log the periodic throughput line (rank 0 only)."""

    def __init__(self, scheduler: Any, inbox: queue.Queue, outbox: queue.Queue,
                 parent_pid: int, lockstep: Any = None, log_stats: bool = True) -> None:
        self.scheduler = scheduler
        self.inbox = inbox
        self.lockstep = lockstep  # tensor_parallel.LockstepInbox when tp_size > 1
        self.outbox = outbox
        self.parent_pid = parent_pid
        self._last_stats = 0.0
        self._peak_kv = 0.0
        self._running = True
        interval = scheduler.args.decode_log_interval if log_stats else 0
        self.throughput = ThroughputLog(interval, scheduler.page_size)

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, TokenizedRequest):
            try:
                self.scheduler.add_request(_make_req(msg))
            except Exception as exc:  # a bad request never kills the loop
                logger.warning("rejecting request %s: %s", msg.rid, one_line(exc))
                self.outbox.put(RequestFailed(msg.rid, one_line(exc)))
        elif isinstance(msg, AbortRequest):
            try:
                outputs = self.scheduler.abort(msg.rid)
                if outputs:
                    self.outbox.put(OutputBatch(list(outputs)))
            except Exception as exc:
                logger.warning("abort of %s failed: %s", msg.rid, one_line(exc))
        elif isinstance(msg, FlushCacheRequest):
            try:
                freed = self.scheduler.flush_cache()
            except Exception as exc:  # a failed flush is answered, never fatal
                logger.warning("flush_cache failed: %s", one_line(exc))
                self.outbox.put(FlushCacheResult(msg.req_id, False, 0, one_line(exc)))
                return
            self.outbox.put(FlushCacheResult(
                msg.req_id, freed is not None, freed or 0,
                "" if freed is not None else "requests are running or queued; flush the "
                "cache when the server is idle"))
        elif isinstance(msg, ShutdownRequest):
            self._running = False
        elif isinstance(msg, Hello):
            pass
        else:
            logger.error("ignoring unknown message %s", type(msg).__name__)

    def _drain(self, block: bool) -> None:
        if self.lockstep is not None:  # every rank handles the same messages in order
            for msg in self.lockstep.take(IDLE_POLL_S if block else None):
                self._handle(msg)
            return
        try:
            msg = self.inbox.get(timeout=IDLE_POLL_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        self._handle(msg)
        while self._running:
            try:
                self._handle(self.inbox.get_nowait())
            except queue.Empty:
                return

    def _stats_due(self, force: bool = False) -> dict[str, Any] | None:
        """The scheduler's stats when a snapshot is due (or ``force``), else None. Every
        call also folds the current KV use into ``peak_kv_usage`` (a running maximum) and
        feeds the throughput log (``gen_throughput`` in the snapshot)."""
        try:
            stats = dict(self.scheduler.get_stats())
            if self.scheduler.has_work():
                line = self.throughput.observe(stats)
                if line is not None:
                    logger.info(line)
            else:
                self.throughput.idle()
        except Exception as exc:  # stats must never stop serving
            return {"stats_error": one_line(exc)}
        stats["gen_throughput"] = self.throughput.gen_throughput
        usage = stats.get("kv_usage")
        if isinstance(usage, (int, float)):
            self._peak_kv = max(self._peak_kv, float(usage))
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_INTERVAL_S:
            return None
        self._last_stats = now
        stats["peak_kv_usage"] = self._peak_kv
        return stats

    def run(self) -> None:
        """Loop until a :class:`ShutdownRequest` arrives or the parent process is gone.
        Exceptions from ``step()`` propagate (they are fatal)."""
        was_busy = False
        while self._running:
            busy = self.scheduler.has_work()
            if was_busy and not busy:  # one last snapshot so idle stats read zero running
                self.outbox.put(OutputBatch([], self._stats_due(force=True)))
            was_busy = busy
            self._drain(block=not busy)
            if not self._running:
                break
            if os.getppid() != self.parent_pid:
                logger.warning("parent process is gone; exiting")
                break
            if not self.scheduler.has_work():
                continue
            was_busy = True
            outputs = self.scheduler.step()
            # a snapshot rides with every batch that finishes a request, so a caller that
            # saw its request finish also sees stats at least that fresh
            stats = self._stats_due(force=any(o.finish for o in outputs))
            if outputs or stats is not None:
                self.outbox.put(OutputBatch(list(outputs), stats))


def _grammar_support(server_args: ServerArgs, vocab_size: int) -> tuple[Any | None, int | None]:
    """xgrammar's tokenizer info (None when xgrammar is missing: constrained requests are
    then refused) and the ``</think>`` id when a reasoning parser is configured."""
    from heteroserve.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path,
                               trust_remote_code=server_args.trust_remote_code)
    think_end_id = None
    if server_args.reasoning_parser:
        from heteroserve.core.grammar.reasoning import ReasoningParser

        think_end_id = ReasoningParser.create(server_args.reasoning_parser,
                                              tokenizer.hf).think_end_id
    try:
        from heteroserve.core.grammar.compiler import tokenizer_info
        info = tokenizer_info(tokenizer.hf, vocab_size)
    except ImportError as exc:
        logger.warning("structured outputs are off: %s", one_line(exc))
        info = None
    return info, think_end_id


def build_scheduler(server_args: ServerArgs, eos_token_ids: list[int],
                    group: Any = None) -> tuple[Any, ReadyInfo]:
    """Build the model runner and the scheduler for ``server_args``; the default factory.
    ``group`` (a :class:`~heteroserve.core.runtime.tensor_parallel.TPGroup`) shards the model
    across ranks; their KV pools are cut to the smallest so all ranks schedule alike."""
    from heteroserve.core.model_runner.build import build_model_runner
    from heteroserve.core.scheduler import Scheduler

    if group is None:
        platform, dispatch, model_runner = build_model_runner(server_args)
    else:
        platform, dispatch, model_runner = build_model_runner(
            server_args, tp_rank=group.info.rank, communicator=group.communicator,
            device_index=server_args.device_index + group.info.local_rank)
        model_runner.num_pages = group.min_across_ranks(model_runner.num_pages)
    page_size = int(model_runner.page_size)
    grammar_info, think_end_id = _grammar_support(server_args, model_runner.vocab_size)
    scheduler = Scheduler(model_runner, server_args, list(eos_token_ids), page_size,
                          grammar_info, think_end_id)
    return scheduler, _ready_info(platform, dispatch, model_runner, scheduler, page_size)


class _Discard:
    """The outbox of ranks other than 0: only rank 0 talks to the frontend."""

    def put(self, item: Any) -> None:
        pass


def _follow(scheduler: Any, group: Any, parent_pid: int) -> None:
    """The loop of a rank other than 0: same messages, same steps, outputs dropped."""
    from heteroserve.core.runtime.tensor_parallel import LockstepInbox

    loop = SchedulerLoop(scheduler, queue.Queue(), _Discard(), parent_pid,  # type: ignore[arg-type]
                         LockstepInbox(group, None), log_stats=False)
    with torch.inference_mode():
        try:
            loop.run()
        except KeyboardInterrupt:
            raise SystemExit(1) from None


def _report_ready(fd: int, kind: str, payload: object) -> None:
    with os.fdopen(fd, "wb") as pipe:
        pipe.write(pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL))


def run_scheduler_process(spec: LaunchSpec) -> None:
    """Process entry point (see the module docstring and :class:`LaunchSpec`). Start-up
    failures go to the ready pipe, loop failures to the frontend as a
    :class:`SchedulerFatal`; either way the process then exits with status 1
    (``SystemExit``). The loop also ends when ``spec.parent_pid`` is no longer this process's
    parent."""
    server_args, tp_rank = spec.server_args, spec.tp_rank
    logging.basicConfig(
        level=server_args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [scheduler tp{tp_rank}] %(name)s: %(message)s")
    group = None
    try:
        if server_args.tp_size > 1:
            from heteroserve.core.runtime.tensor_parallel import init_tensor_parallel
            from heteroserve.core.plugins.manager import load_plugins

            platform = load_plugins().select(server_args.platform, server_args.device)
            group = init_tensor_parallel(server_args, platform, tp_rank)
            scheduler, info = build_scheduler(server_args, list(spec.eos_token_ids), group)
        else:
            scheduler, info = (spec.factory or build_scheduler)(server_args,
                                                                list(spec.eos_token_ids))
    except BaseException as exc:
        logger.debug("start-up failed", exc_info=True)
        _report_ready(spec.ready_fd, "error", one_line(exc))
        raise SystemExit(1) from None

    if group is not None and group.info.rank != 0:
        _report_ready(spec.ready_fd, "ready", info)
        _follow(scheduler, group, spec.parent_pid)
        return
    io_cores = io_thread_cores(scheduler)
    channel = Channel.connect(spec.addresses, io_cores)
    inbox: queue.Queue = queue.Queue()
    receiver = _Receiver(channel, inbox, io_cores)
    sender = _Sender(channel, io_cores)
    receiver.start()
    sender.start()
    _report_ready(spec.ready_fd, "ready", info)
    lockstep = None
    if group is not None:
        from heteroserve.core.runtime.tensor_parallel import LockstepInbox

        lockstep = LockstepInbox(group, inbox)
    logger.debug("ready: platform=%s kv_tokens=%d page_size=%d context=%d", info.platform,
                 info.max_total_tokens, info.page_size, info.max_context_len)
    code = 0
    try:
        with torch.inference_mode():  # as the model runner; lets samplers edit logits in place
            SchedulerLoop(scheduler, inbox, sender.outbox, spec.parent_pid, lockstep).run()
    except KeyboardInterrupt:
        sender.outbox.put(SchedulerFatal("scheduler interrupted"))
        code = 1
    except BaseException as exc:
        logger.exception("scheduler loop failed")
        sender.outbox.put(SchedulerFatal(f"scheduler failed: {one_line(exc)}"))
        code = 1
    finally:
        sender.outbox.put(_STOP)
        sender.join(timeout=5)
        receiver.stopping.set()
        receiver.join(timeout=2)
        if sender.is_alive() or receiver.is_alive():
            os._exit(code or 1)  # a stuck socket must not leave this process behind
        channel.close()
    if code:
        raise SystemExit(code)
