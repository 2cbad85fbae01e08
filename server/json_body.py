"""Request bodies parsed off the event loop when they are large.

FastAPI parses a JSON body with ``await request.json()`` on the event loop; a body of
megabytes (a long prompt) would stall every other request for tens of milliseconds.
:class:`OffLoopJSONRoute` gives the routes a request whose ``json()`` decodes bodies over
:data:`OFF_LOOP_BYTES` in a worker thread, and bodies over
:data:`~heteroserve.server.body_parser.OFF_PROCESS_BYTES` in the app's
:class:`~heteroserve.server.body_parser.BodyParser` helper process (``app.state.body_parser``;
a thread where the app has none).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from heteroserve.server.body_parser import OFF_PROCESS_BYTES

OFF_LOOP_BYTES = 256 * 1024


class _OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            parser = getattr(self.app.state, "body_parser", None)
            if len(body) > OFF_PROCESS_BYTES and parser is not None:
                self._json = await parser.parse(body)
            elif len(body) > OFF_LOOP_BYTES:
                self._json = await asyncio.to_thread(json.loads, body)
            else:
                self._json = json.loads(body)
        return self._json


class OffLoopJSONRoute(APIRoute):
    """An ``APIRoute`` whose handler sees :class:`_OffLoopJSONRequest` requests."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OffLoopJSONRequest(request.scope, request.receive))

        return route
