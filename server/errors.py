"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

:class:`APIError` is what route code raises; :func:`install_error_handlers` makes FastAPI
render it, its own validation errors (422 -> 400), unknown routes and unexpected exceptions in
that one shape. :func:`engine_error` maps the engine runtime's exceptions to HTTP statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from heteroserve.core.runtime.errors import (
    EngineDeadError, QueueFullError, RequestError, one_line,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait, in seconds

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded",
          500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An HTTP error rendered as an OpenAI error object.

    ``status``: the HTTP status; ``message``: one line; ``type`` defaults per status
    (``invalid_request_error`` for 4xx); ``param``: the offending request field or None;
    ``code``: a short machine-readable code or None; ``headers``: extra response headers
    (``Retry-After`` on 429).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500
                                       else "internal_server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        """This error as a JSON response with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    """A 400 ``invalid_request_error`` about ``param``."""
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def engine_error(exc: BaseException) -> APIError:
    """Map an exception from ``EngineClient.generate`` (or its iterator) to an APIError:
    RequestError -> 400, QueueFullError -> 429 with Retry-After, EngineDeadError -> 503,
    anything else -> 500 (logged with its traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(400, one_line(exc), param=exc.param,
                        code="invalid_value" if exc.param else None)
    if isinstance(exc, QueueFullError):
        return APIError(429, one_line(exc), code="rate_limit_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, one_line(exc), code="engine_dead")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {one_line(exc)}")


def _loc_param(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # pydantic adds the union member it tried ("str", "list[int]"...) after the field name
    # (a literal's allowed values, or a model's class name, for a union of those)
    parts = [p for p in parts if not (p.startswith(("list[", "dict[", "literal[")) or p in
                                      ("str", "int", "float", "bool", "function-after")
                                      or (p[:1].isupper() and p.isidentifier()))]
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation failure (bad JSON, wrong types, out-of-range values) as a 400
    naming the first offending field."""
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(400, f"malformed JSON body: {ctx.get('error', 'cannot parse')}",
                        code="invalid_json")
    param = _loc_param(first.get("loc", ()))
    kind = first.get("type")
    if kind == "missing" and param is None:
        return bad_request("the request body is empty; send a JSON object")
    if kind == "missing":
        return bad_request(f"missing required field {param!r}", param)
    if param is None and kind == "model_attributes_type":
        return bad_request("the request body must be a JSON object "
                           "(with Content-Type: application/json)")
    same = [e for e in errors if _loc_param(e.get("loc", ())) == param]
    if len(same) == len(errors) > 1:  # one field failed every member of a union type
        options = "; or ".join(dict.fromkeys(str(e.get("msg", "")) for e in errors))
        return bad_request(f"invalid value for {param!r}: {options}", param)
    msg = str(first.get("msg", "invalid value"))
    text = f"invalid value for {param!r}: {msg}" if param else msg
    more = len(errors) - 1
    return bad_request(text + (f" (and {more} more error{'s' * (more > 1)})" if more else ""),
                       param)


def install_error_handlers(app: FastAPI) -> None:
    """Render APIError, validation errors, HTTP errors (404 route, 405 method) and unexpected
    exceptions as OpenAI error objects on ``app``."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        param = getattr(exc, "param", None)  # set by body_parser.FieldTooLong
        code = "not_found" if exc.status_code == 404 else "invalid_value" if param else None
        return APIError(exc.status_code, str(exc.detail), param=param, code=code,
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return engine_error(exc).response()
