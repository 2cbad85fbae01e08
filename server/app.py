"""The app factory: ``create_app(client, server_args)`` -> a FastAPI app serving the OpenAI
and native routes over an already started ``EngineClient``.

The app does not start the engine (``serve_cmd`` does, before the HTTP socket opens, so the
start-up banner can say what was resolved); it shuts the client down when the app's lifespan
ends, i.e. after uvicorn has drained in-flight requests. :class:`EdgeLimits` caps request
bodies (413) and turns new requests away while the server drains (503).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from heteroserve import __version__
from heteroserve.core.config import ServerArgs
from heteroserve.core.runtime.admission import CHARS_PER_TOKEN_BOUND
from heteroserve.server.body_parser import BodyParser
from heteroserve.server.context import ServerContext
from heteroserve.server.embeddings import router as embeddings_router
from heteroserve.server.errors import install_error_handlers
from heteroserve.server.limits import EdgeLimits
from heteroserve.server.metrics import ServerMetrics
from heteroserve.server.routes_admin import admin_router
from heteroserve.server.routes_native import native_router, ops_router
from heteroserve.server.routes_openai import router as openai_router
from heteroserve.server.tool_calls import create_parser

logger = logging.getLogger(__name__)


def served_model_name(server_args: ServerArgs) -> str:
    """The name clients put in ``model``: ``--served-model-name``, else ``--model-path``."""
    return server_args.served_model_name or server_args.model_path or "heteroserve-default"


def _reasoning_parser(server_args: ServerArgs, client: Any) -> Any:
    if not server_args.reasoning_parser:
        return None
    from heteroserve.core.grammar.reasoning import ReasoningParser

    return ReasoningParser.create(server_args.reasoning_parser, client.tokenizer.hf)


def create_app(client: Any, server_args: ServerArgs, shutdown_client: bool = True,
               model_aliases: tuple[str, ...] = ()) -> FastAPI:
    """A FastAPI app over ``client`` (an ``EngineClient`` or an object with its interface).

    ``shutdown_client``: call ``client.shutdown()`` when the app's lifespan ends.
    ``model_aliases``: more names ``model`` fields may carry (listed after the served name by
    ``/v1/models``). Raises ``ValueError`` for an unknown ``--reasoning-parser`` or
    ``--tool-call-parser``.
    """
    model_name = served_model_name(server_args)
    metrics = ServerMetrics(client, model_name, int(client.info.max_context_len),
                            server_args.metrics_compat)
    ctx = ServerContext(client=client, server_args=server_args, model_name=model_name,
                        model_aliases=tuple(model_aliases), metrics=metrics,
                        reasoning_parser=_reasoning_parser(server_args, client),
                        tool_parser=create_parser(server_args.tool_call_parser)
                        if server_args.tool_call_parser else None)

    body_parser = BodyParser(max(int(client.info.max_context_len) * CHARS_PER_TOKEN_BOUND,
                                 server_args.grammar_max_bytes), int(client.info.max_context_len))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        body_parser.close()
        if shutdown_client:
            logger.info("stopping the engine")
            await asyncio.to_thread(client.shutdown)

    app = FastAPI(title="heteroserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible and SGLang-native LLM serving API.")
    app.state.ctx = ctx
    app.state.body_parser = body_parser
    app.state.draining = False
    app.add_middleware(EdgeLimits, max_body_bytes=server_args.max_request_bytes,
                       is_draining=lambda: app.state.draining)
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(embeddings_router)
    app.include_router(native_router)
    app.include_router(admin_router)
    app.include_router(ops_router)
    return app
