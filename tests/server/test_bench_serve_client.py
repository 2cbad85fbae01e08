"""``heteroserve bench serve``'s client: metric arithmetic, SSE parsing and load control against
a scripted streaming server (tests/support/fake_openai_stream.py), datasets, CLI wiring."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest
from fake_openai_stream import MODEL, FakeStreamServer

from heteroserve.server import bench_cmd, bench_serve
from heteroserve.server.bench_serve import ClientConfig, LoadConfig, run_benchmark
from heteroserve.server.bench_serve_data import BenchPrompt, WorkloadSpec, make_prompts
from heteroserve.server.bench_serve_metrics import RequestResult, summarize
from heteroserve.server.cli import build_parser, main

STEP = 0.05  # seconds between the scripted text events


def _run(url: str, prompts: list[BenchPrompt], **load: object) -> bench_serve.BenchRun:
    cfg = ClientConfig(base_url=url, request_timeout_s=10.0)
    return asyncio.run(run_benchmark(cfg, LoadConfig(**load), prompts))


def test_summary_arithmetic_matches_hand_computed_values() -> None:
    a = RequestResult(10, 8, text_times=[0.1, 0.3, 0.6], events=4, latency=1.0,
                      prompt_tokens=12, completion_tokens=5)
    b = RequestResult(7, 8, text_times=[0.2, 0.4], events=2, latency=0.5)  # no usage
    c = RequestResult(9, 8)
    c.fail("http 503", "overloaded")
    m = summarize([a, b, c], duration_s=2.0)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_input_tokens"] == 12 + 7  # usage when reported, else the nominal length
    assert m["total_output_tokens"] == 5 + 2  # usage, else the chunks with text
    assert m["output_tokens_from"] == "usage+chunks"
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_throughput"] == pytest.approx(13.0)
    assert m["concurrency"] == pytest.approx(0.75)
    assert m["ttft_ms_mean"] == pytest.approx(150) and m["ttft_ms_p90"] == pytest.approx(190)
    assert m["itl_ms_p50"] == pytest.approx(200) and m["itl_ms_max"] == pytest.approx(300)
    assert m["itl_ms_mean"] == pytest.approx(700 / 3)
    assert m["tpot_ms_p50"] == pytest.approx((225 + 300) / 2)  # (1.0-0.1)/4 and (0.5-0.2)/1
    assert m["e2e_ms_mean"] == pytest.approx(750)
    assert m["chunks_with_text_per_reply"] == pytest.approx(2.5)
    assert m["chunks_with_text_per_token"] == pytest.approx(5 / 7)
    assert m["events_without_text_per_reply"] == pytest.approx(0.5)
    assert m["errors"] == {"http 503": 1}
    empty = summarize([c], duration_s=1.0)
    assert empty["ttft_ms_p50"] is None and empty["chunks_with_text_per_token"] is None


def test_streams_are_timed_as_received_and_tokens_come_from_usage() -> None:
    prompts = make_prompts(WorkloadSpec("random-ids", 4, 16, 8, vocab_size=100))
    with FakeStreamServer([(STEP, "a"), (STEP, "b"), (STEP, "c")], completion_tokens=6) as srv:
        run = _run(srv.url, prompts, max_concurrency=2)
    assert run.model == MODEL
    assert len(srv.bodies) == 5  # warm-up + 4
    body = srv.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 8 and body["model"] == MODEL
    assert all(isinstance(t, int) for t in body["prompt"]) and len(body["prompt"]) == 16
    assert srv.max_in_flight == 2
    for r in run.results:
        assert r.ok and len(r.text_times) == 3 and r.text_chars == 3
        assert r.ttft >= STEP * 0.9 and all(g >= STEP * 0.9 for g in r.gaps)
        assert r.latency >= r.text_times[-1]
        assert (r.generated_tokens, r.prompt_tokens) == (6, 11)
    m = summarize(run.results, run.duration_s)
    assert m["chunks_with_text_per_token"] == pytest.approx(0.5)  # 3 chunks carry 6 tokens
    assert m["events_without_text_per_reply"] == pytest.approx(2)  # finish + usage events
    assert m["output_tokens_from"] == "usage"
    assert run.duration_s >= 2 * 3 * STEP * 0.9  # two waves of two


def test_without_usage_tokens_are_counted_as_chunks_and_errors_by_kind(tmp_path: Path) -> None:
    lines = [{"prompt": "hello there"}, {"prompt": "fail"}, {"prompt": "broken"},
             {"prompt": [5, 6, 7], "output_len": 3}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    prompts = make_prompts(WorkloadSpec("jsonl", 10, 1, 4, dataset_path=str(data)))
    assert [p.output_len for p in prompts] == [4, 4, 4, 3] and prompts[3].input_len == 3
    with FakeStreamServer([(0.0, "x"), (0.0, "y")], completion_tokens=None) as srv:
        run = _run(srv.url, prompts)
    ok, fail, broken, ids = run.results
    assert ok.ok and ok.generated_tokens == 2 and ok.completion_tokens is None
    assert (fail.error_kind, fail.error) == ("http 503", "overloaded")
    assert (broken.error_kind, broken.error) == ("stream error", "engine died")
    assert ids.ok and [b["max_tokens"] for b in srv.bodies if b["prompt"] == [5, 6, 7]] == [3]
    m = summarize(run.results, run.duration_s)
    assert m["errors"] == {"http 503": 1, "stream error": 1}
    assert m["output_tokens_from"] == "chunks" and m["total_output_tokens"] == 4


def test_chat_endpoint_reads_delta_content() -> None:
    prompts = make_prompts(WorkloadSpec("random", 2, 5, 4))
    assert all(isinstance(p.prompt, str) and len(p.prompt.split()) == 5 for p in prompts)
    with FakeStreamServer([(0.0, "hi"), (0.0, " there")], completion_tokens=2) as srv:
        cfg = ClientConfig(base_url=srv.url, endpoint="chat", ignore_eos=False)
        run = asyncio.run(run_benchmark(cfg, LoadConfig(), prompts))
    # the requests run concurrently: the server may receive them in any order
    sent = sorted((b["messages"] for b in srv.bodies[1:]), key=str)  # after the warm-up
    assert sent == sorted(([{"role": "user", "content": p.prompt}] for p in prompts), key=str)
    assert not any("ignore_eos" in b for b in srv.bodies)
    assert all(r.ok and len(r.text_times) == 2 and r.text_chars == 8 for r in run.results)
    with pytest.raises(ValueError, match="--endpoint chat"):
        bench_serve.build_payload(cfg, MODEL, BenchPrompt([1, 2], 2, 1))


def test_poisson_arrivals_follow_the_seeded_intervals() -> None:
    rate, seed, n = 10.0, 3, 5
    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(n - 1)]
    prompts = make_prompts(WorkloadSpec("random-ids", n, 4, 2, vocab_size=50))
    with FakeStreamServer([(0.0, "a")], completion_tokens=1) as srv:
        _run(srv.url, prompts, request_rate=rate, seed=seed)
    arrivals = srv.arrivals[1:]  # after the warm-up, on a warm connection
    assert len(arrivals) == n
    for i in range(n - 1):  # never earlier than planned (less 20 ms of scheduling jitter)
        assert arrivals[i + 1] - arrivals[0] >= sum(gaps[:i + 1]) - 0.02


def test_run_stops_at_its_timeout() -> None:
    prompts = make_prompts(WorkloadSpec("random-ids", 3, 4, 2, vocab_size=50))
    with FakeStreamServer([(30.0, "late")], completion_tokens=1) as srv:
        start = time.perf_counter()
        run = _run(srv.url, prompts, timeout_s=0.3, warmup_requests=0)
        assert time.perf_counter() - start < 3.0
    assert [r.error_kind for r in run.results] == ["timeout"] * 3
    assert summarize(run.results, run.duration_s)["errors"] == {"timeout": 3}


def test_workloads_are_deterministic_and_validated(tmp_path: Path) -> None:
    spec = WorkloadSpec("shared-prefix", 6, 5, 3, num_groups=2, prefix_len=7, seed=9)
    a, b = make_prompts(spec), make_prompts(spec)
    assert a == b and len(a) == 6 and all(p.input_len == 12 for p in a)
    assert a[0].prompt.split("\n\n")[0] == a[2].prompt.split("\n\n")[0] != a[1].prompt.split(
        "\n\n")[0]
    ids = make_prompts(WorkloadSpec("random-ids", 3, 8, 2, vocab_size=20))
    assert all(len(p.prompt) == 8 and all(1 <= t < 20 for t in p.prompt) for p in ids)
    with pytest.raises(ValueError, match="--input-len"):
        make_prompts(WorkloadSpec("random", 2, 0, 2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'prompt'"):
        make_prompts(WorkloadSpec("jsonl", 5, 1, 2, dataset_path=str(bad)))


def test_bench_keeps_the_offline_benchmark_and_adds_serve() -> None:
    parser = build_parser()
    offline = parser.parse_args(["bench", "--num-prompts", "3", "--plot", "x.png"])
    assert offline.run is bench_cmd.run and offline.bench_mode is None
    assert (offline.num_prompts, offline.plot) == (3, "x.png")
    serve = parser.parse_args(["bench", "serve", "--num-prompts", "5", "--max-concurrency", "2",
                               "--dataset-name", "random", "--random-input-len", "9"])
    assert serve.run is bench_serve.run and serve.bench_mode == "serve"
    assert (serve.num_prompts, serve.max_concurrency, serve.dataset, serve.input_len) == (
        5, 2, "random", 9)
    assert serve.request_rate == float("inf")


def test_cli_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    report, png = tmp_path / "serve.json", tmp_path / "serve.png"
    with FakeStreamServer([(0.01, "a"), (0.01, "b")], completion_tokens=2) as srv:
        rc = main(["bench", "serve", "--base-url", srv.url, "--num-prompts", "3",
                   "--input-len", "4", "--output-len", "2", "--vocab-size", "50",
                   "--request-rate", "100", "--disable-tqdm", "--output-json", str(report),
                   "--plot", str(png)])
    assert rc == 0
    assert "SSE chunks with text per generated token" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["summary"]["completed"] == 3 and data["summary"]["total_output_tokens"] == 6
    assert data["load"]["request_rate"] == 100 and len(data["requests"]) == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["bench", "serve", "--base-url", srv.url, "--extra-body", "[1]"])
    assert rc == 1 and "--extra-body must be a JSON object" in capsys.readouterr().err
