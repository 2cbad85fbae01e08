"""Admission stays off the event loop and inside its limits, through HTTP: ``/health`` keeps
answering while a pathological schema compiles and a huge prompt is refused; the queue limit
holds under a burst; streaming sends one event per token; deltas add up to the full reply."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_harness import MODEL_NAME, ServerProcess

pytestmark = pytest.mark.timeout(300)


def _health_latencies(probe: httpx.Client, running, count: int = 0) -> list[float]:
    """``/health`` latencies in seconds, polled every 50 ms while ``running()`` (or
    ``count`` times)."""
    out: list[float] = []
    while running() or len(out) < count:
        started = time.perf_counter()
        assert probe.get("/health").status_code == 200
        out.append(time.perf_counter() - started)
        time.sleep(0.05)
    return out


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096


@pytest.fixture(scope="module")
def limited_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("admission") / "server.log"
    proc = ServerProcess(tiny_model, log, "--max-running-requests", "4",
                         "--max-queued-requests", "8", "--grammar-compile-timeout", "3")
    yield proc
    proc.stop()


# Posts both pathological requests at once from a separate process (so that encoding 10 MB of
# JSON holds that process's GIL, not the prober's) and prints {name: [status, body]}.
_POST_BOTH = """
import json, sys, threading, httpx
url, model = sys.argv[1], sys.argv[2]
props = {f"p{i}": {"type": "string"} for i in range(2000)}
schema = {"type": "object", "properties": props, "required": list(props)}
bodies = {
    "schema": {"model": model, "prompt": "x", "max_tokens": 4,
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "big", "schema": schema}}},
    "prompt": {"model": model, "prompt": "y" * (10 * 1024 * 1024), "max_tokens": 4},
}
out = {}
def post(name):
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as c:
        r = c.post("/v1/completions", json=bodies[name])
        out[name] = [r.status_code, r.text]
threads = [threading.Thread(target=post, args=(n,)) for n in bodies]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def _health_while_posting(url: str) -> tuple[dict, list[float], list[float]]:
    """``(responses, /health latencies while both posts run, idle latencies before and
    after, as many)``."""
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as probe:
        idle = _health_latencies(probe, lambda: False, count=20)
        poster = subprocess.Popen([sys.executable, "-c", _POST_BOTH, url, MODEL_NAME],
                                  stdout=subprocess.PIPE, text=True)
        busy = _health_latencies(probe, lambda: poster.poll() is None)
        stdout, _ = poster.communicate(timeout=120)
        idle += _health_latencies(probe, lambda: False, count=len(busy))
    return json.loads(stdout), busy, idle


def test_health_answers_while_a_huge_schema_compiles_and_a_huge_prompt_arrives(
        limited_server: ServerProcess) -> None:
    """The bound is the issue's 100 ms plus the worst /health of this (2-core) machine when
    the server is idle, before and after (as many polls as while busy). A blocked event loop
    misses it every time; a hiccup of the shared machine gets one more try (once 171 ms in
    CI beside the other test worker; at most 34 ms in 10 runs here, with and without a
    CPU-bound process beside it)."""
    url = limited_server.url
    rss_before = _rss(limited_server.proc.pid)
    for attempt in range(2):
        results, busy, idle = _health_while_posting(url)
        assert results["schema"][0] == 400, results["schema"][1]
        assert "compile" in json.loads(results["schema"][1])["error"]["message"]
        assert results["prompt"][0] == 400, results["prompt"][1]
        refused = json.loads(results["prompt"][1])["error"]
        # refused by the JSON helper process: the 10 MB string never reached the server
        assert refused["param"] == "prompt" and "10485760 characters" in refused["message"]
        worst, noise = max(busy), max(idle)
        if worst < 0.1 + noise:
            break
    assert worst < 0.1 + noise, f"/health took {worst:.3f}s twice (idle worst {noise:.3f}s)"
    assert _rss(limited_server.proc.pid) - rss_before < 1024 ** 3
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "z",
                                                   "max_tokens": 2}, trust_env=False, timeout=60)
    assert ok.status_code == 200


def test_large_bodies_go_through_the_json_helper_and_bad_ones_get_400s(
        limited_server: ServerProcess) -> None:
    """Bodies over 4 MB are parsed in the helper process: a valid one reaches admission
    (which refuses 700k prompt ids for this context), broken JSON is the usual 400, and an
    overlong chat message is refused by path."""
    with httpx.Client(base_url=limited_server.url, timeout=120, trust_env=False) as c:
        ids = c.post("/v1/completions", json={"model": MODEL_NAME, "max_tokens": 1,
                                              "prompt": [7] * 700_000})
        assert ids.status_code == 400, ids.text
        assert "700000" in ids.json()["error"]["message"], ids.text  # admission counted them
        broken = c.post("/v1/completions", content=b'{"prompt": "' + b"a" * (5 << 20),
                        headers={"content-type": "application/json"})
        assert broken.status_code == 400 and "malformed JSON" in broken.json()["error"]["message"]
        chat = c.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "b" * (6 << 20)}]})
        assert chat.status_code == 400, chat.text
        assert chat.json()["error"]["param"] == "messages[0].content"
        ok = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "z", "max_tokens": 2})
        assert ok.status_code == 200


def test_a_burst_over_the_queue_limit_gets_429s(limited_server: ServerProcess) -> None:
    """40 requests at once against 4 running + 8 queued: at most 12 are admitted. Every
    stream stays open until all 40 have their status, so no admitted request ends (and frees
    its place) during the burst."""
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    start, answered = threading.Barrier(40), threading.Barrier(40)

    def one(i: int) -> int:
        # rids that look like health probes get no special treatment
        with httpx.Client(base_url=limited_server.url, timeout=120, trust_env=False) as c:
            start.wait()
            with c.stream("POST", "/v1/completions",
                          json={**body, "rid": f"HEALTH_CHECK_{i}"}) as resp:
                answered.wait()  # closing the stream aborts the request: not before all answered
                return resp.status_code

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(one, range(40)))
    assert set(codes) <= {200, 429}
    assert codes.count(200) <= 12, codes
    assert codes.count(429) >= 28
    limited_server.wait_metrics(lambda m: m["heteroserve:num_requests_inflight"] == 0)


def test_streaming_sends_one_event_per_token_and_deltas_add_up(
        limited_server: ServerProcess) -> None:
    body = {"model": MODEL_NAME, "prompt": "The sun rises", "max_tokens": 24,
            "ignore_eos": True, "temperature": 0, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=limited_server.url, timeout=60, trust_env=False) as c:
        full = c.post("/v1/completions", json=body).json()
        events = []
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
    chunks = [e for e in events if e["choices"]]
    tokens = [t for e in chunks for t in e["choices"][0]["logprobs"]["tokens"]]
    assert len(chunks) == 24 and len(tokens) == 24  # one event per generated token
    assert "".join(e["choices"][0]["text"] for e in chunks) == full["choices"][0]["text"]
    assert events[-1]["usage"]["completion_tokens"] == 24
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
