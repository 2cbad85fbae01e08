"""Many concurrent streams, and clients that leave: every request completes or is aborted,
and afterwards the engine holds no KV for any request (read from ``/metrics``). The server
runs on ``$HETEROSERVE_TEST_PLATFORM`` (default cpu); on a device with events, requests
queued behind ``--max-running-requests`` exercise the overlap scheduler's chained decode
steps."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from server_harness import API_KEY, MODEL_NAME, ServerProcess, kv_idle

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CLIENTS = 64
TOKENS = 8


async def _stream_one(client: httpx.AsyncClient, i: int, tokens: int = TOKENS,
                      leave_after: int | None = None) -> tuple[str, str | None, int]:
    """One streamed completion of ``tokens`` tokens: ``(text, finish reason, usage)``; with
    ``leave_after`` the client closes the stream after that many events (``(text, None,
    -1)``)."""
    body = {"model": MODEL_NAME, "prompt": f"Client {i} says", "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "temperature": 0.8, "seed": i}
    text, reason, usage, done = "", None, -1, False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if leave_after is not None and (leave_after := leave_after - 1) <= 0:
                return text, None, -1  # leaving the block closes the connection
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
            else:
                usage = chunk["usage"]["completion_tokens"]
    assert done
    return text, reason, usage


def test_64_concurrent_streams_then_kv_empty(server) -> None:
    async def main() -> list:
        limits = httpx.Limits(max_connections=CLIENTS + 4, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=120.0,
                                     limits=limits, trust_env=False) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(_stream_one(client, i) for i in range(CLIENTS))), 150)

    before = server.metrics()
    results = asyncio.run(main())
    assert len(results) == CLIENTS
    assert all(reason == "length" and usage == TOKENS for _, reason, usage in results)
    after = server.wait_metrics(kv_idle)
    assert kv_idle(after), after
    finished = after["heteroserve:requests_finished_total"] - before["heteroserve:requests_finished_total"]
    assert finished >= CLIENTS
    assert after["heteroserve:requests_aborted_total"] == before["heteroserve:requests_aborted_total"]


def _long_request(stream: bool) -> dict:
    return {"model": MODEL_NAME, "prompt": "Tell me everything", "max_tokens": 1900,
            "ignore_eos": True, "stream": stream}


def test_disconnect_mid_stream_aborts_and_frees_kv(server) -> None:
    before = server.wait_metrics(kv_idle)
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=60.0,
                      trust_env=False) as client:
        with client.stream("POST", "/v1/completions", json=_long_request(True)) as resp:
            assert resp.status_code == 200
            lines = 0
            for line in resp.iter_lines():
                lines += bool(line)
                if lines >= 3:
                    break  # leaving the block closes the connection mid-stream
    t0 = time.monotonic()
    after = server.wait_metrics(
        lambda m: kv_idle(m) and m["heteroserve:requests_aborted_total"]
        > before["heteroserve:requests_aborted_total"])
    assert kv_idle(after), after
    assert after["heteroserve:requests_aborted_total"] == before["heteroserve:requests_aborted_total"] + 1
    generated = after["heteroserve:generation_tokens_total"] - before["heteroserve:generation_tokens_total"]
    assert generated < 1900, "the request ran to completion instead of being aborted"
    assert time.monotonic() - t0 < 20


def test_disconnect_before_non_streaming_reply_aborts(server) -> None:
    before = server.wait_metrics(kv_idle)
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=1.0,
                      trust_env=False) as client:
        try:
            client.post("/v1/completions", json=_long_request(False))
            raise AssertionError("a 1900-token request answered within the 1 s timeout")
        except httpx.ReadTimeout:
            pass  # the client gives up and closes its connection
    after = server.wait_metrics(
        lambda m: kv_idle(m) and m["heteroserve:requests_aborted_total"]
        > before["heteroserve:requests_aborted_total"])
    assert kv_idle(after), after
    assert after["heteroserve:requests_aborted_total"] == before["heteroserve:requests_aborted_total"] + 1


@pytest.fixture(scope="module")
def queueing_server(tiny_model, tmp_path_factory):
    """A server that runs at most 4 requests at once: the rest queue."""
    proc = ServerProcess(tiny_model, tmp_path_factory.mktemp("queue") / "server.log",
                         "--api-key", API_KEY, "--max-running-requests", "4")
    yield proc
    assert proc.stop() == 0, proc.log()


def test_streams_queued_beyond_max_running_with_clients_leaving(queueing_server) -> None:
    """24 streams against 4 running slots; every third client leaves after two events of a
    long request. The others complete with every token, the leavers are aborted, and no KV
    stays held."""
    server = queueing_server
    leavers = set(range(0, 24, 3))

    async def main() -> list:
        limits = httpx.Limits(max_connections=28, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=120.0,
                                     limits=limits, trust_env=False) as client:
            return await asyncio.wait_for(asyncio.gather(*(
                _stream_one(client, i, 400, leave_after=2) if i in leavers
                else _stream_one(client, i) for i in range(24))), 150)

    before = server.wait_metrics(kv_idle)
    results = asyncio.run(main())
    kept = [r for i, r in enumerate(results) if i not in leavers]
    assert all(reason == "length" and usage == TOKENS for _, reason, usage in kept)
    after = server.wait_metrics(
        lambda m: kv_idle(m) and m["heteroserve:requests_aborted_total"]
        >= before["heteroserve:requests_aborted_total"] + len(leavers))
    assert kv_idle(after), after
    aborted = after["heteroserve:requests_aborted_total"] - before["heteroserve:requests_aborted_total"]
    assert aborted == len(leavers)
