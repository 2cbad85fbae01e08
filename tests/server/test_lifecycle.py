"""Start-up, back-pressure and shutdown of ``heteroserve serve``: the start-up block, 429 when
the queue is full, a taken port, and SIGTERM draining in-flight requests then exiting 0 with
no engine process left behind. Uses its own server (one running request, one queued)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from platform_under_test import TEST_PLATFORM
from server_harness import MODEL_NAME, ServerProcess, pid_alive

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("lifecycle") / "server.log"
    proc = ServerProcess(tiny_model, log, "--max-running-requests", "1",
                         "--max-queued-requests", "1", "--shutdown-timeout", "60",
                         "--log-level", "info")
    yield proc
    proc.stop()


def _long(stream: bool, tokens: int = 1500) -> dict:
    return {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": tokens,
            "ignore_eos": True, "stream": stream}


def test_startup_block(small_server) -> None:
    log = small_server.log()
    block = log[log.index("heteroserve is ready"):]
    for needle in (f"platform   {TEST_PLATFORM}", "device", "KV pool", "kernels", small_server.url):
        assert needle in block, needle


def test_queue_full_is_429_with_retry_after(small_server) -> None:
    with httpx.Client(base_url=small_server.url, timeout=60.0, trust_env=False) as client:
        with client.stream("POST", "/v1/completions", json=_long(True)) as running:
            lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
            assert next(lines).startswith("data: ")
            with client.stream("POST", "/v1/completions", json=_long(True)) as queued:
                assert queued.status_code == 200
                small_server.wait_metrics(lambda m: m["heteroserve:num_requests_inflight"] == 2)
                with httpx.Client(base_url=small_server.url, timeout=30.0,
                                  trust_env=False) as other:
                    resp = other.post("/v1/chat/completions", json={
                        "model": MODEL_NAME, "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["retry-after"]) >= 1
    err = resp.json()["error"]
    assert err["type"] == "rate_limit_exceeded" and err["message"]


def test_port_in_use_fails_fast(tiny_model, small_server) -> None:
    port = int(small_server.url.rsplit(":", 1)[1])
    out = subprocess.run([sys.executable, "-m", "heteroserve.server.cli", "serve",
                          "--model-path", str(tiny_model), "--port", str(port)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_sigterm_drains_then_exits_cleanly(small_server) -> None:
    small_server.wait_metrics(lambda m: m["heteroserve:num_requests_inflight"] == 0)
    engine_pid = httpx.get(small_server.url + "/get_server_info",
                           trust_env=False).json()["engine"]["pid"]
    assert pid_alive(engine_pid)
    events = []
    with httpx.Client(base_url=small_server.url, timeout=60.0, trust_env=False) as client:
        with client.stream("POST", "/v1/completions", json=_long(True, 60)) as resp:
            lines = resp.iter_lines()
            events.append(next(lines))
            small_server.proc.send_signal(signal.SIGTERM)
            events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # drained, not cut off
    code = small_server.proc.wait(60)
    assert code == 0, small_server.log()
    deadline = time.monotonic() + 15
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(engine_pid), "the engine process outlived the server"
    with pytest.raises(httpx.TransportError):
        httpx.get(small_server.url + "/health", timeout=2.0, trust_env=False)
    assert "Traceback" not in small_server.log()


def test_dead_engine_makes_the_server_exit_nonzero(tiny_model, tmp_path) -> None:
    """kill -9 of the engine: the in-flight stream ends with an error event and [DONE], and
    the server logs why and exits with status 1 within 5 s (so a supervisor restarts it)."""
    server = ServerProcess(tiny_model, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as client:
            engine_pid = client.get("/get_server_info").json()["engine"]["pid"]
            with client.stream("POST", "/v1/completions", json=_long(True)) as resp:
                lines = resp.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(engine_pid, signal.SIGKILL)
                killed = time.monotonic()
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["error"]["code"] == "engine_dead"
        code = server.proc.wait(10)
        assert code == 1 and time.monotonic() - killed < 5.0 + 1.0, server.log()
        assert "engine process died" in server.log()
    finally:
        server.stop()


def test_keep_serving_flag_answers_503_after_engine_death(tiny_model, tmp_path) -> None:
    server = ServerProcess(tiny_model, tmp_path / "server.log", "--keep-serving-on-engine-death")
    try:
        with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as client:
            engine_pid = client.get("/get_server_info").json()["engine"]["pid"]
            os.kill(engine_pid, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while client.get("/health").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.get("/health").status_code == 503
            assert client.get("/health_generate").status_code == 503
            resp = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"})
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "engine_dead"
            assert server.metrics()["heteroserve:engine_alive"] == 0.0
        assert server.stop() == 0, server.log()
    finally:
        server.stop()


def test_sigterm_past_the_grace_period_ends_requests_with_errors(tiny_model, tmp_path) -> None:
    """Requests still running when --shutdown-timeout passes end with an OpenAI error: a
    503 JSON body, or for a stream an error event then [DONE]; the server exits 0."""
    server = ServerProcess(tiny_model, tmp_path / "server.log", "--shutdown-timeout", "1",
                           "--max-running-requests", "4")
    results: dict[str, httpx.Response] = {}

    def post_plain() -> None:
        with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False) as c:
            results["plain"] = c.post("/v1/completions", json=_long(False))

    import threading

    plain = threading.Thread(target=post_plain)
    try:
        with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False) as client:
            with client.stream("POST", "/v1/completions", json=_long(True)) as resp:
                lines = resp.iter_lines()
                assert next(lines).startswith("data: ")
                plain.start()
                server.wait_metrics(lambda m: m["heteroserve:num_requests_inflight"] == 2)
                server.proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        plain.join(30)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][len("data: "):])["error"]
        assert error["code"] == "server_shutting_down"
        assert results["plain"].status_code == 503
        assert results["plain"].json()["error"]["code"] == "server_shutting_down"
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop()
