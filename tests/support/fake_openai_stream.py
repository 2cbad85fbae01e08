"""A scripted OpenAI-compatible streaming server for client tests (``heteroserve bench serve``).

:class:`FakeStreamServer` runs a raw ASGI app under uvicorn in a thread on a free loopback
port. Every ``/v1/completions`` or ``/v1/chat/completions`` reply streams the same script:
for each ``(delay_s, text)`` it sleeps ``delay_s`` then sends one SSE event with ``text``, then
a finish event without text, then (when ``completion_tokens`` is set and the request asked for
``stream_options.include_usage``) a usage event without choices, then ``data: [DONE]``.

A prompt (or first chat message) equal to ``"fail"`` gets a 503 JSON error; ``"broken"`` gets
one text event and then an error event. ``bodies`` holds every request body received;
``max_in_flight`` the most streaming replies open at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from server_harness import free_port

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL = "fake-model"


class FakeStreamServer:
    """See the module docstring. Use as a context manager."""

    def __init__(self, script: list[tuple[float, str]], completion_tokens: int | None,
                 prompt_tokens: int = 11) -> None:
        self.script = script
        self.completion_tokens = completion_tokens
        self.prompt_tokens = prompt_tokens
        self.bodies: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self._app, host="127.0.0.1", port=self.port, log_level="error",
                                lifespan="off", interface="asgi3",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeStreamServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if scope["path"] == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [{"id": MODEL}]})
            return
        body = json.loads(raw or b"{}")
        self.bodies.append(body)
        self.arrivals.append(time.perf_counter())
        chat = scope["path"] == "/v1/chat/completions"
        prompt = body["messages"][0]["content"] if chat else body.get("prompt")
        if prompt == "fail":
            await self._json(send, 503, {"error": {"message": "overloaded", "code": 503}})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._stream(send, chat, prompt == "broken",
                               bool((body.get("stream_options") or {}).get("include_usage")))
        finally:
            self.in_flight -= 1

    async def _stream(self, send: Send, chat: bool, broken: bool, include_usage: bool) -> None:
        async def event(data: object) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(),
                        "more_body": True})

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        for delay, text in self.script:
            await asyncio.sleep(delay)
            await event({"id": "x", "choices": [choice(text, None)]})
            if broken:
                await event({"error": {"message": "engine died", "code": 500}})
                break
        else:
            await event({"id": "x", "choices": [choice("", "length")]})
            if include_usage and self.completion_tokens is not None:
                await event({"id": "x", "choices": [], "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "total_tokens": self.prompt_tokens + self.completion_tokens}})
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _json(send: Send, status: int, obj: object) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(obj).encode()})
