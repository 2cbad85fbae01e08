"""SGLang's administrative routes that its tools call: ``/flush_cache`` and ``/version``,
plus the tokenizer routes of :mod:`~heteroserve.server.tokenize_routes`.

``/flush_cache`` (GET or POST, as SGLang) empties the engine's radix prefix cache through a
typed control message to the scheduler process: 200 ``{"flushed": true, "freed_pages"}``
when done, 400 (an OpenAI error, code ``cache_busy``) while requests are queued or running,
503 when the engine is gone. ``/version`` answers ``{"version"}`` without an API key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from heteroserve import __version__
from heteroserve.core.runtime.errors import EngineDeadError
from heteroserve.server.auth import require_api_key
from heteroserve.server.context import ServerContext, get_context
from heteroserve.server.errors import APIError
from heteroserve.server.protocol import ErrorResponse
from heteroserve.server.tokenize_routes import tokenize_router

FLUSH_TIMEOUT_S = 30.0

admin_router = APIRouter()
_flush_router = APIRouter(tags=["native"], dependencies=[Depends(require_api_key)],
                          responses={s: {"model": ErrorResponse} for s in (400, 401, 503)})
_version_router = APIRouter(tags=["operations"])


@_flush_router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(ctx: ServerContext = Depends(get_context)) -> dict[str, Any]:
    """Empty the radix prefix cache (see the module docstring)."""
    try:
        result = await ctx.client.flush_cache(timeout=FLUSH_TIMEOUT_S)
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_dead") from None
    except TimeoutError:
        raise APIError(503, f"the engine did not answer within {FLUSH_TIMEOUT_S:.0f} s",
                       code="engine_busy") from None
    if not result.flushed:
        raise APIError(400, f"the cache was not flushed: {result.message}", code="cache_busy")
    return {"flushed": True, "freed_pages": result.freed_pages,
            "message": "the prefix cache is empty"}


@_version_router.get("/version")
async def version() -> dict[str, str]:
    """heteroserve's version."""
    return {"version": __version__}


admin_router.include_router(_flush_router)
admin_router.include_router(_version_router)
admin_router.include_router(tokenize_router)
