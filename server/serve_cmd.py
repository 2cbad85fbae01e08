"""``heteroserve serve``: the OpenAI-compatible HTTP server.

Order of start-up: bind the socket (a taken port fails at once, before any model loads;
connections are refused until the server is ready), start the engine (``EngineClient`` spawns the scheduler process and waits until it is
ready), log one start-up block (platform, device, kernels per op, KV pool, URL), then serve with
uvicorn in this process (HTTP and tokenization here; decoding in the engine process).

SIGTERM or Ctrl-C: uvicorn stops accepting connections and new requests get a 503; in-flight
requests may finish for up to ``--shutdown-timeout`` seconds, then each still running ends
with an OpenAI error (a 503 JSON body; for a stream an error event then ``data: [DONE]``); the
app's lifespan stops the engine process and the command returns 0.

When the engine process dies, the server logs why and exits with status 1 within a few
seconds (so a supervisor restarts it), unless ``--keep-serving-on-engine-death``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import socket
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from heteroserve.core.scheduler.outputs import SHUTDOWN_CODE, FinishReason
from heteroserve.server.args import (
    add_positional_model, add_server_args, log_level_arg, server_args_from_namespace,
)

logger = logging.getLogger("heteroserve.server")

DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand (every ServerArgs option plus server-only ones)."""
    p = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                       description="Start the OpenAI-compatible HTTP server (plus SGLang's "
                                   "native /generate) for one model.")
    add_positional_model(p)
    groups = add_server_args(p, serve=True)
    http, logs = groups["HTTP server"], groups["logging and metrics"]
    http.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                      metavar="SECONDS",
                      help="on SIGTERM, wait this long for in-flight requests before aborting "
                           f"them (default: {DEFAULT_SHUTDOWN_TIMEOUT_S})")
    logs.add_argument("--disable-access-log", action="store_true",
                      help="do not log one line per HTTP request")
    logs.add_argument("--uvicorn-log-level", type=log_level_arg, default=None, metavar="LEVEL",
                      help="log level of the HTTP server's own logger (default: --log-level)")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="accepted for vLLM command lines: heteroserve never logs request "
                           "contents (--disable-access-log drops the per-request line)")
    p.set_defaults(run=run)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0 picks a free one), not yet listening, so
    that clients are refused rather than left hanging until the engine is ready. Raises
    ``OSError`` with one line (``cannot listen on HOST:PORT: ...``) when the address is taken
    or invalid."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def startup_banner(info: Any, model_name: str, model_path: str, url: str,
                   api_key: bool) -> str:
    """What the server adds to the engine's start-up block (platform, model, KV pool and the
    kernel chosen per op, logged once by the engine process): where to reach it."""
    kernels = getattr(info, "kernels", []) or []
    native = sum(1 for row in kernels if len(row) > 2 and row[2] == "native")
    lines = [
        "heteroserve is ready",
        f"  model      {model_name}  ({model_path})",
        f"  platform   {info.platform}",
        f"  device     {info.device}",
        f"  KV pool    {info.max_total_tokens} tokens, page size {info.page_size}",
        f"  context    {info.max_context_len} tokens; up to {info.max_running_requests} "
        "running requests",
        f"  kernels    {native} of {len(kernels)} ops native (per-op table in the engine block above)",
        f"  API        {url}/v1  (OpenAI)   {url}/generate  (native)   "
        f"{url}/metrics   {url}/docs",
        f"  auth       {'Bearer API key required' if api_key else 'none'}",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the engine starts, make SIGTERM interrupt start-up (so the half-started scheduler
    process is stopped by EngineClient's clean-up instead of being orphaned)."""
    def handler(sig: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {sig} during start-up")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: seconds uvicorn waits, after the drain ended the last requests, for their replies to go out
REPLY_GRACE_S = 5.0


def _uvicorn_server(app: Any, client: Any, log_level: str, shutdown_timeout: float,
                    access_log: bool) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with heteroserve's drain: on SIGTERM / Ctrl-C new requests get a
        503, in-flight ones have ``shutdown_timeout`` seconds, then the engine ends the rest
        with an error; a SIGTERM-triggered shutdown ends the process normally (exit code 0)
        instead of re-raising SIGTERM after the drain."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not app.state.draining:
                app.state.draining = True
                loop = asyncio.get_event_loop()
                loop.call_soon_threadsafe(loop.call_later, shutdown_timeout, _end_in_flight)
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    def _end_in_flight() -> None:
        count = client.registry.num_inflight()
        if count:
            logger.warning("shutdown: ending %d request(s) still in flight", count)
        client.end_all(FinishReason.error("the server is shutting down", code=SHUTDOWN_CODE))

    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(),
                            access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout + REPLY_GRACE_S),
                            timeout_keep_alive=5)
    return Server(config)


def _exit_when_engine_dies(server: Any, client: Any, outcome: dict[str, int]) -> None:
    """On engine death: log why, stop serving at once, exit status 1."""
    def died(reason: str) -> None:
        logger.error("the engine process died (%s); the server exits", reason)
        outcome["code"] = 1
        server.should_exit = True
        server.force_exit = True

    client.on_death(died)


def _serve_worker_node(server_args) -> int:
    """``--node-rank N > 0``: run this node's tensor-parallel ranks (they follow global rank 0
    on node 0, which serves HTTP) until they exit or SIGTERM arrives."""
    from heteroserve.core.runtime.frontend import EngineClient

    with _sigterm_interrupts():
        client = EngineClient(server_args)
    logger.info("worker node %d of %d: ranks started, following %s", server_args.node_rank,
                server_args.nnodes, server_args.dist_init_addr)
    try:
        while client.is_alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        client.shutdown()
    return 0


def run(args: argparse.Namespace) -> int:
    """Start the engine and serve until SIGTERM / Ctrl-C. Returns 0 after a clean shutdown.
    Raises ``OSError`` (port taken), ``ValueError`` (bad option) or ``RuntimeError`` (engine
    start-up failed), each with one line."""
    from heteroserve.core.models.tiny import DEFAULT_MODEL_NAME, ensure_default_model
    from heteroserve.core.runtime.frontend import EngineClient
    from heteroserve.server.app import create_app, served_model_name
    from heteroserve.server.tool_calls import create_parser

    server_args = server_args_from_namespace(args)
    if server_args.tool_call_parser:
        create_parser(server_args.tool_call_parser)  # refuse a bad name before loading the model
    if args.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    if server_args.node_rank > 0:
        return _serve_worker_node(server_args)
    sock = bind_socket(server_args.host, server_args.port)
    try:
        aliases: tuple[str, ...] = ()
        if server_args.model_path is None:
            # the default model's id is its local folder, so that clients which load the
            # tokenizer by model id (bench_serving, lm-eval) find it; its short name still works
            server_args = dataclasses.replace(server_args, model_path=str(ensure_default_model()))
            aliases = () if server_args.served_model_name else (DEFAULT_MODEL_NAME,)
        with _sigterm_interrupts():
            client = EngineClient(server_args)
        outcome = {"code": 0}
        try:
            app = create_app(client, server_args, model_aliases=aliases)
            logger.info(startup_banner(client.info, served_model_name(server_args),
                                       str(server_args.model_path), _url(sock),
                                       bool(server_args.api_key)))
            server = _uvicorn_server(app, client, args.uvicorn_log_level or server_args.log_level,
                                     args.shutdown_timeout,
                                     not args.disable_access_log)
            if not server_args.keep_serving_on_engine_death:
                _exit_when_engine_dies(server, client, outcome)
            # everything alive now (torch, transformers, the app) lives as long as the
            # process: keep it out of the collector's full passes, which would otherwise
            # stop the event loop for 100+ ms while a large request allocates
            gc.collect()
            gc.freeze()
            try:
                sock.listen(2048)
            except OSError as exc:
                raise OSError(f"cannot listen on {_url(sock)}: {exc.strerror or exc}") from None
            server.run(sockets=[sock])
        finally:
            client.shutdown()
    finally:
        sock.close()
    if outcome["code"]:
        logger.error("heteroserve stopped: the engine process died")
        return outcome["code"]
    logger.info("heteroserve stopped")
    return 0
