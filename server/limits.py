"""ASGI middleware at the server's edge: request body size (413) and draining (503).

It runs before routing and before FastAPI reads the body: a declared ``Content-Length`` over
the limit is refused at once, a streamed body is counted as it arrives and refused when it
passes the limit; while the server drains for shutdown, new POST requests get a 503.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"
                                 if status < 500 else "service_unavailable",
                                 "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class EdgeLimits:
    """Wraps ``app``; ``max_body_bytes`` caps request bodies; ``is_draining()`` turns new
    POST requests away with a 503 while the server shuts down."""

    def __init__(self, app: ASGIApp, max_body_bytes: int,
                 is_draining: Callable[[], bool]) -> None:
        self.app, self.max_body_bytes, self.is_draining = app, max_body_bytes, is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST" and self.is_draining():
            await _reply(send, 503, "the server is shutting down", "server_shutting_down")
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _reply(send, 413, f"the request body is larger than {limit} bytes",
                             "request_too_large")
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        await self.app(scope, counted, send)
