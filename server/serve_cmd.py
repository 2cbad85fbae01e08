"""``heteroserve serve``: the OpenAI-compatible HTTP server.

Order of start-up: bind the socket (a taken port fails at once, before any model loads;
connections are refused until the server is ready), start the engine (``EngineClient`` spawns the scheduler process and waits until it is
ready), log one start-up block (platform, device, kernels per op, KV pool, URL), then serve with
uvicorn in this process (HTTP and tokenization here; decoding in the engine process).

SIGTERM or Ctrl-C: uvicorn stops accepting connections, drains in-flight requests for up to
``--shutdown-timeout`` seconds (then cancels them, which aborts them in the engine), the app's
lifespan stops the engine process, and the command returns 0 (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from heteroserve.server.args import add_server_args, server_args_from_namespace

logger = logging.getLogger("heteroserve.server")

DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand (every ServerArgs option plus server-only ones)."""
    p = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server",
                       description="Start the OpenAI-compatible HTTP server (plus SGLang's "
                                   "native /generate) for one model.")
    add_server_args(p)
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   metavar="SECONDS",
                   help="on SIGTERM, wait this long for in-flight requests before aborting "
                        f"them (default: {DEFAULT_SHUTDOWN_TIMEOUT_S})")
    p.add_argument("--disable-access-log", action="store_true",
                   help="do not log one line per HTTP request")
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


def build_scheduler_detached(server_args: Any, eos_token_ids: list[int]) -> Any:
    """The default scheduler factory, run in the scheduler process after it stops reacting
    to SIGINT and SIGTERM: a Ctrl-C or a SIGTERM sent to the whole process group (systemd,
    ``timeout``) must reach only the server, which drains requests and then stops the engine
    itself (the engine also exits when this process dies)."""
    from heteroserve.core.runtime.scheduler_process import build_scheduler

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return build_scheduler(server_args, eos_token_ids)


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


def _uvicorn_server(app: Any, log_level: str, shutdown_timeout: float, access_log: bool) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM-triggered graceful shutdown ends the process
        normally (exit code 0) instead of re-raising SIGTERM after the drain."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
                captured.remove(sig)

    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(),
                            access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]
                            timeout_keep_alive=5)
    return Server(config)


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

    server_args = server_args_from_namespace(args)
    if args.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    if server_args.node_rank > 0:
        return _serve_worker_node(server_args)
    sock = bind_socket(server_args.host, server_args.port)
    try:
        if server_args.model_path is None:
            server_args = dataclasses.replace(
                server_args, model_path=str(ensure_default_model()),
                served_model_name=server_args.served_model_name or DEFAULT_MODEL_NAME)
        with _sigterm_interrupts():
            client = EngineClient(server_args, scheduler_factory=build_scheduler_detached)
        try:
            app = create_app(client, server_args)
            logger.info(startup_banner(client.info, served_model_name(server_args),
                                       str(server_args.model_path), _url(sock),
                                       bool(server_args.api_key)))
            server = _uvicorn_server(app, server_args.log_level, args.shutdown_timeout,
                                     not args.disable_access_log)
            try:
                sock.listen(2048)
            except OSError as exc:
                raise OSError(f"cannot listen on {_url(sock)}: {exc.strerror or exc}") from None
            server.run(sockets=[sock])
        finally:
            client.shutdown()
    finally:
        sock.close()
    logger.info("heteroserve stopped")
    return 0
