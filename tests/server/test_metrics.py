"""``GET /metrics`` scraped over HTTP from real servers and parsed with prometheus_client:
``heteroserve:`` names with a ``model_name`` label whose values match the requests made,
KV usage that ignores the evictable prefix cache, ``--metrics-compat vllm|sglang`` names,
and the engine's periodic throughput line in the server log."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import API_KEY, MODEL_NAME, ServerProcess, kv_idle, labelled_samples

from heteroserve.server.metrics_table import FINISH_REASONS, METRICS

M = "heteroserve:"
PROMPT = list(range(3, 43))  # 40 tokens: whole pages the prefix cache keeps


def _scrape(http: httpx.Client) -> str:
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return resp.text


def _generate(http: httpx.Client, ids: list[int], **params) -> dict:
    params.setdefault("temperature", 0)
    resp = http.post("/generate", json={"input_ids": ids, "sampling_params": params})
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"model_name": MODEL_NAME, **labels}.items()))), 0.0)


def test_heteroserve_names_labels_and_values(server, http) -> None:
    before = labelled_samples(_scrape(http))
    first = _generate(http, PROMPT, max_new_tokens=5, ignore_eos=True)
    again = _generate(http, PROMPT, max_new_tokens=3, ignore_eos=True)  # prefix-cache hit
    probe = http.post("/generate", json={"input_ids": [7, 8, 9], "sampling_params": {
        "max_new_tokens": 1, "temperature": 0, "ignore_eos": True}}).json()["output_ids"][0]
    stopped = _generate(http, [7, 8, 9], max_new_tokens=6, stop_token_ids=[probe])  # greedy:
    # its first token is the probe's, so it ends there with finish reason "stop"
    metas = [first, again, stopped]
    assert [m["finish_reason"]["type"] for m in metas] == ["length", "length", "stop"]
    metas.append({"prompt_tokens": 3, "completion_tokens": 1})  # the probe (length)
    server.wait_metrics(lambda m: m[f"{M}requests_finished_total"]
                        >= _value(before, f"{M}requests_finished_total") + 4)
    server.wait_metrics(kv_idle)
    text = _scrape(http)
    after = labelled_samples(text)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for spec in METRICS:
        family = families[M + spec.name]
        assert family.type == spec.kind.value, spec.name
        assert family.samples and all(s.labels["model_name"] == MODEL_NAME
                                      for s in family.samples), spec.name
    assert not [n for n in families if not n.startswith(M)]  # no compat names by default

    assert delta(f"{M}request_success_total", finished_reason="length") == 3
    assert delta(f"{M}request_success_total", finished_reason="stop") == 1
    assert delta(f"{M}request_success_total", finished_reason="abort") == 0
    assert {s.labels["finished_reason"] for s in families[f"{M}request_success"].samples} \
        == set(FINISH_REASONS)
    prompt = sum(m["prompt_tokens"] for m in metas)
    generated = sum(m["completion_tokens"] for m in metas)
    assert delta(f"{M}prompt_tokens_total") == prompt
    assert delta(f"{M}generation_tokens_total") == generated
    assert delta(f"{M}requests_total") == 4
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert delta(f"{M}{name}_count") == 4, name
        assert delta(f"{M}{name}_bucket", le="+Inf") == 4, name
    assert delta(f"{M}request_prompt_tokens_sum") == prompt
    assert delta(f"{M}request_generation_tokens_sum") == generated
    assert delta(f"{M}inter_token_latency_seconds_count") == sum(
        m["completion_tokens"] - 1 for m in metas)
    assert delta(f"{M}time_per_output_token_seconds_count") == sum(
        1 for m in metas if m["completion_tokens"] > 1)
    assert delta(f"{M}e2e_request_latency_seconds_sum") >= delta(
        f"{M}time_to_first_token_seconds_sum") > 0
    hits = delta(f"{M}prefix_cache_hits_total")
    assert again["cached_tokens"] > 0 and hits >= again["cached_tokens"]
    assert delta(f"{M}prefix_cache_queries_total") >= hits
    # idle, with the prefix cache holding the prompts: KV usage reads 0
    assert _value(after, f"{M}kv_evictable_tokens") >= again["cached_tokens"]
    assert _value(after, f"{M}kv_cache_usage_perc") == 0.0
    assert _value(after, f"{M}kv_used_tokens") == 0.0
    assert _value(after, f"{M}gen_throughput") == 0.0
    assert _value(after, f"{M}kv_total_tokens") > 0
    assert _value(after, f"{M}engine_alive") == 1.0


@pytest.fixture(scope="module")
def compat_servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[dict[str, ServerProcess]]:
    """A ``--metrics-compat vllm`` server with vLLM's ``--disable-log-stats``, and a
    ``--metrics-compat sglang`` server logging a throughput line every decode step."""
    logs = tmp_path_factory.mktemp("compat-logs")
    flags = {"vllm": ("--log-level", "info", "--disable-log-stats"),
             "sglang": ("--log-level", "info", "--decode-log-interval", "1")}

    def start(flavour: str) -> ServerProcess:
        return ServerProcess(tiny_model, logs / f"{flavour}.log", "--api-key", API_KEY,
                             "--metrics-compat", flavour, *flags[flavour])

    with ThreadPoolExecutor(2) as pool:  # the two start-ups overlap
        futures = {flavour: pool.submit(start, flavour) for flavour in flags}
    procs = {f: fut.result() for f, fut in futures.items() if fut.exception() is None}
    try:
        for fut in futures.values():
            fut.result()  # re-raise a start-up failure (after the others are stopped)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def _client(proc: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=proc.url, timeout=60.0, trust_env=False,
                        headers={"Authorization": f"Bearer {API_KEY}"})


def _run_two(proc: ServerProcess) -> tuple[str, int]:
    """Two completed requests (12 and 4 tokens), idle after; returns the scrape and the
    tokens generated."""
    with _client(proc) as http:
        metas = [_generate(http, PROMPT, max_new_tokens=12, ignore_eos=True),
                 _generate(http, [5, 6, 7], max_new_tokens=4, ignore_eos=True)]
        proc.wait_metrics(lambda m: kv_idle(m) and m[f"{M}requests_finished_total"] >= 2)
        return _scrape(http), sum(m["completion_tokens"] for m in metas)


def test_metrics_compat_vllm(compat_servers) -> None:
    proc = compat_servers["vllm"]
    text, generated = _run_two(proc)
    samples = labelled_samples(text)
    labels = {"engine": "0"}
    for ours, theirs in [("num_requests_running", "num_requests_running"),
                         ("num_requests_waiting", "num_requests_waiting"),
                         ("kv_cache_usage_perc", "kv_cache_usage_perc"),
                         ("kv_cache_usage_perc", "gpu_cache_usage_perc"),
                         ("prompt_tokens_total", "prompt_tokens_total"),
                         ("generation_tokens_total", "generation_tokens_total"),
                         ("prefix_cache_queries_total", "prefix_cache_queries_total"),
                         ("prefix_cache_hits_total", "prefix_cache_hits_total"),
                         ("num_preemptions_total", "num_preemptions_total"),
                         ("time_to_first_token_seconds_count", "time_to_first_token_seconds_count"),
                         ("time_per_output_token_seconds_count",
                          "time_per_output_token_seconds_count"),
                         ("inter_token_latency_seconds_count", "inter_token_latency_seconds_count"),
                         ("e2e_request_latency_seconds_sum", "e2e_request_latency_seconds_sum"),
                         ("request_queue_time_seconds_count", "request_queue_time_seconds_count"),
                         ("request_prompt_tokens_sum", "request_prompt_tokens_sum"),
                         ("request_generation_tokens_sum", "request_generation_tokens_sum")]:
        key = (f"vllm:{theirs}", tuple(sorted({"model_name": MODEL_NAME, **labels}.items())))
        assert key in samples, theirs
        assert samples[key] == _value(samples, M + ours), theirs
    assert _value(samples, "vllm:request_success_total", finished_reason="length",
                  **labels) == 2
    assert _value(samples, "vllm:generation_tokens_total", **labels) == generated
    assert _value(samples, "vllm:request_generation_tokens_count", **labels) == 2
    assert _value(samples, "vllm:time_to_first_token_seconds_bucket", le="+Inf",
                  **labels) == 2
    assert _value(samples, "vllm:kv_cache_usage_perc", **labels) == 0.0
    assert not [k for k in samples if k[0].startswith("sglang:")]
    assert "Decode batch." not in proc.log()  # --disable-log-stats


def test_metrics_compat_sglang_and_throughput_log(compat_servers) -> None:
    proc = compat_servers["sglang"]
    text, generated = _run_two(proc)
    samples = labelled_samples(text)
    for ours, theirs in [("num_requests_running", "num_running_reqs"),
                         ("num_requests_waiting", "num_queue_reqs"),
                         ("kv_cache_usage_perc", "token_usage"),
                         ("kv_used_tokens", "num_used_tokens"),
                         ("cache_hit_rate", "cache_hit_rate"),
                         ("gen_throughput", "gen_throughput"),
                         ("kv_total_tokens", "max_total_num_tokens"),
                         ("prompt_tokens_total", "prompt_tokens_total"),
                         ("generation_tokens_total", "generation_tokens_total"),
                         ("requests_total", "num_requests_total"),
                         ("time_to_first_token_seconds_count", "time_to_first_token_seconds_count"),
                         ("inter_token_latency_seconds_sum", "inter_token_latency_seconds_sum"),
                         ("e2e_request_latency_seconds_count", "e2e_request_latency_seconds_count"),
                         ("request_queue_time_seconds_count", "queue_time_seconds_count")]:
        key = (f"sglang:{theirs}", (("model_name", MODEL_NAME),))
        assert key in samples, theirs
        assert samples[key] == _value(samples, M + ours), theirs
    assert _value(samples, "sglang:generation_tokens_total") == generated
    assert _value(samples, "sglang:e2e_request_latency_seconds_count") == 2
    assert _value(samples, "sglang:token_usage") == 0.0
    assert not [k for k in samples if k[0].startswith("vllm:")]
    lines = [line for line in proc.log().splitlines() if "Decode batch." in line]
    assert lines, proc.log()
    assert "#running-req: " in lines[0] and "gen throughput (token/s): " in lines[0]
    assert "#queue-req: " in lines[0] and "token usage: " in lines[0]
