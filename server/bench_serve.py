"""``heteroserve bench serve``: a load generator for any OpenAI-compatible server.

Streams ``/v1/completions`` (default) or ``/v1/chat/completions`` with ``stream: true`` and
``stream_options.include_usage`` over httpx, for the prompts of a workload (see
:mod:`heteroserve.server.bench_serve_data`), sent all at once (``--request-rate inf``, the
default) or as a Poisson process, at most ``--max-concurrency`` in flight. A warm-up request
runs first and is not counted. Metrics are SGLang bench_serving's (see
:mod:`heteroserve.server.bench_serve_metrics`), measured on what the client receives, plus
SSE chunks with text per reply and per generated token, and errors grouped by kind.

Every run ends by itself: after ``--num-prompts`` replies, or at ``--timeout`` seconds (requests
still running are cancelled and counted as ``timeout`` errors).

    heteroserve bench serve --base-url http://127.0.0.1:30000 --dataset random-ids \
        --vocab-size 32000 --input-len 1024 --output-len 256 --num-prompts 64 \
        --max-concurrency 16 --output-json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from heteroserve.server.bench_serve_data import (
    DATASETS, BenchPrompt, WorkloadSpec, load_tokenizer_for_text, make_prompts,
)
from heteroserve.server.bench_serve_metrics import RequestResult, print_table, summarize

if TYPE_CHECKING:
    import httpx

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
WARMUP_OUTPUT_LEN = 16


@dataclass(frozen=True)
class ClientConfig:
    """How requests are sent. ``extra_body`` is merged into every request body last."""

    base_url: str = "http://127.0.0.1:30000"
    endpoint: str = "completions"
    model: str | None = None
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, object] = field(default_factory=dict)
    request_timeout_s: float = 600.0


@dataclass(frozen=True)
class LoadConfig:
    """How requests are scheduled: Poisson arrivals at ``request_rate`` per second (inf: all
    at once), at most ``max_concurrency`` in flight (None: no cap), the whole run cut at
    ``timeout_s``."""

    request_rate: float = float("inf")
    max_concurrency: int | None = None
    timeout_s: float = 3600.0
    warmup_requests: int = 1
    seed: int = 1
    progress: bool = False


@dataclass
class BenchRun:
    """One run: the model served, per-request results (in prompt order), wall time, and the
    CPU time this client process spent meanwhile (near ``duration_s``: the client itself may
    be the bottleneck and its timestamps late)."""

    model: str
    results: list[RequestResult]
    duration_s: float
    client_cpu_s: float


def build_payload(cfg: ClientConfig, model: str, prompt: BenchPrompt) -> dict[str, object]:
    """The request body for ``prompt``. Raises ``ValueError`` for token ids on chat."""
    body: dict[str, object] = {
        "model": model, "max_tokens": prompt.output_len, "temperature": cfg.temperature,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        if not isinstance(prompt.prompt, str):
            raise ValueError("--endpoint chat needs text prompts (not --dataset random-ids)")
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    body.update(cfg.extra_body)
    return body


def _headers(cfg: ClientConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:200] or "(empty body)"
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    msg = err.get("message", err) if isinstance(err, dict) else err
    return str(msg)[:200]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _event_text(event: dict[str, object], chat: bool) -> str:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if chat:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return ""
        return str(delta.get("content") or "") + str(delta.get("reasoning_content") or "")
    return str(choice.get("text") or "")


async def send_request(client: httpx.AsyncClient, cfg: ClientConfig, model: str,
                       prompt: BenchPrompt) -> RequestResult:
    """Stream one request and record what arrived when; never raises for server faults (they
    become the result's ``error``)."""
    import httpx

    res = RequestResult(prompt.input_len, prompt.output_len)
    body = build_payload(cfg, model, prompt)
    chat = cfg.endpoint == "chat"
    start = time.perf_counter()
    try:
        async with client.stream("POST", cfg.base_url.rstrip("/") + ENDPOINTS[cfg.endpoint],
                                 json=body, headers=_headers(cfg)) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                res.fail(f"http {resp.status_code}", _error_message(text))
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - start
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    res.fail("bad event", f"not JSON: {data[:80]!r}")
                    break
                if not isinstance(event, dict):
                    continue
                res.events += 1
                if "error" in event:
                    res.fail("stream error", _error_message(data))
                    break
                text = _event_text(event, chat)
                if text:
                    res.text_times.append(now)
                    res.text_chars += len(text)
                usage = event.get("usage")
                if isinstance(usage, dict):
                    if isinstance(usage.get("prompt_tokens"), int):
                        res.prompt_tokens = usage["prompt_tokens"]
                    if isinstance(usage.get("completion_tokens"), int):
                        res.completion_tokens = usage["completion_tokens"]
    except httpx.TimeoutException as exc:
        res.fail("timeout", f"no data for --request-timeout {cfg.request_timeout_s}s "
                            f"({type(exc).__name__})")
    except httpx.HTTPError as exc:
        res.fail("transport", f"{type(exc).__name__}: {_first_line(exc)}")
    res.latency = time.perf_counter() - start
    return res


async def _resolve_model(client: httpx.AsyncClient, cfg: ClientConfig) -> str:
    import httpx

    if cfg.model:
        return cfg.model
    url = cfg.base_url.rstrip("/") + "/v1/models"
    try:
        resp = await client.get(url, headers=_headers(cfg))
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"cannot list the served model at {url} ({_first_line(exc)}); "
                           "pass --model"
                           ) from None


async def run_benchmark(cfg: ClientConfig, load: LoadConfig, prompts: list[BenchPrompt]
                        ) -> BenchRun:
    """Warm up, then send ``prompts`` as ``load`` says and collect their results. Raises
    ``RuntimeError`` when the server cannot be reached or every warm-up request fails."""
    import httpx

    if not prompts:
        raise ValueError("no prompts to send")
    limits = httpx.Limits(max_connections=load.max_concurrency, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s), limits=limits,
                                 trust_env=False) as client:
        model = await _resolve_model(client, cfg)
        warm = BenchPrompt(prompts[0].prompt, prompts[0].input_len,
                           min(prompts[0].output_len, WARMUP_OUTPUT_LEN))
        for _ in range(load.warmup_requests):
            res = await send_request(client, cfg, model, warm)
            if not res.ok:
                raise RuntimeError(f"warm-up request failed ({res.error_kind}): {res.error}")
        results = [RequestResult(p.input_len, p.output_len) for p in prompts]
        for r in results:
            r.fail("timeout", f"not finished within --timeout {load.timeout_s}s")
        sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        bar = None
        if load.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="bench serve", unit="req")

        async def one(i: int, prompt: BenchPrompt) -> None:
            if sem is None:
                results[i] = await send_request(client, cfg, model, prompt)
            else:
                async with sem:
                    results[i] = await send_request(client, cfg, model, prompt)
            if bar is not None:
                bar.update(1)

        async def dispatch() -> None:
            rng = random.Random(load.seed)
            tasks = []
            for i, prompt in enumerate(prompts):
                tasks.append(asyncio.create_task(one(i, prompt)))
                if load.request_rate != float("inf") and i + 1 < len(prompts):
                    await asyncio.sleep(rng.expovariate(load.request_rate))
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()

        start, cpu = time.perf_counter(), time.process_time()
        try:
            await asyncio.wait_for(dispatch(), load.timeout_s)
        except asyncio.TimeoutError:
            pass
        duration, cpu = time.perf_counter() - start, time.process_time() - cpu
        if bar is not None:
            bar.close()
    return BenchRun(model, results, duration, cpu)


def request_rows(results: list[RequestResult]) -> list[dict[str, object]]:
    """Per-request rows for the JSON report (times in ms)."""
    return [{"input_len": r.input_len, "prompt_tokens": r.prompt_tokens,
             "generated_tokens": r.generated_tokens if r.ok else None,
             "chunks_with_text": len(r.text_times),
             "ttft_ms": None if r.ttft is None else r.ttft * 1000,
             "e2e_ms": None if r.latency is None or not r.ok else r.latency * 1000,
             "error": r.error_kind} for r in results]


def plot_run(path: str, title: str, results: list[RequestResult]) -> None:
    """TTFT, inter-chunk gap, E2E and chunks-per-reply distributions as one PNG."""
    from heteroserve.server.bench_plot import plot_distributions

    ok = [r for r in results if r.ok]
    plot_distributions(path, title, {
        "TTFT (ms)": [r.ttft * 1000 for r in ok if r.ttft is not None],
        "inter-chunk gap = ITL (ms)": [g * 1000 for r in ok for g in r.gaps],
        "E2E latency (ms)": [r.latency * 1000 for r in ok if r.latency is not None],
        "SSE chunks with text per reply": [float(len(r.text_times)) for r in ok],
    })


# -- command line ------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` under ``heteroserve bench``."""
    p = sub.add_parser("serve", help="load-test a running OpenAI-compatible server over HTTP",
                       description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=ClientConfig.base_url)
    p.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS,
                   default="random-ids")
    p.add_argument("--dataset-path", default=None, help="jsonl: the prompts file")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder: random text from its vocabulary")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=128,
                   help="prompt tokens (random / shared-prefix without --tokenizer: words; "
                        "the server's usage gives the real count)")
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int,
                   default=64, help="max_tokens per request")
    p.add_argument("--vocab-size", type=int, default=WorkloadSpec.vocab_size,
                   help="random-ids: ids are drawn from [1, VOCAB_SIZE)")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: number of prefixes")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: prefix length")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request body")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="longest wait for the next bytes of one reply")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="the whole run ends after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(run=run)


def _configs(args: argparse.Namespace) -> tuple[ClientConfig, LoadConfig, WorkloadSpec]:
    extra: dict[str, object] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--extra-body is not JSON: {exc.msg}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be > 0")
    if args.timeout <= 0 or args.request_timeout <= 0:
        raise ValueError("--timeout and --request-timeout must be > 0")
    cfg = ClientConfig(args.base_url, args.endpoint, args.model, args.api_key, args.ignore_eos,
                       args.temperature, extra, args.request_timeout)
    load = LoadConfig(args.request_rate, args.max_concurrency, args.timeout,
                      max(args.warmup_requests, 0), args.seed, not args.disable_tqdm)
    spec = WorkloadSpec(args.dataset, args.num_prompts, args.input_len, args.output_len,
                        args.vocab_size, args.num_groups, args.prefix_len, args.dataset_path,
                        args.seed)
    return cfg, load, spec


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write ``--output-json`` / ``--plot``. Returns 1
    when any request failed."""
    cfg, load, spec = _configs(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    prompts = make_prompts(spec, load_tokenizer_for_text(args.tokenizer))
    if cfg.endpoint == "chat" and not all(isinstance(p.prompt, str) for p in prompts):
        raise ValueError("--endpoint chat needs text prompts (not --dataset random-ids)")
    bench = asyncio.run(run_benchmark(cfg, load, prompts))
    summary = summarize(bench.results, bench.duration_s)
    print_table(summary, f"bench serve: {bench.model} @ {cfg.base_url}")
    for err in sorted({f"{r.error_kind}: {r.error}" for r in bench.results if not r.ok})[:3]:
        print(f"error: {err}")
    if args.output_json:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "model": bench.model,
            "client": {**asdict(cfg), "api_key": bool(cfg.api_key)},
            "load": {**asdict(load), "request_rate": load.request_rate
                     if math.isfinite(load.request_rate) else "inf"},
            "workload": asdict(spec),
            "summary": summary, "client_cpu_s": bench.client_cpu_s,
            "requests": request_rows(bench.results),
        }
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.output_json}")
    if args.plot:
        plot_run(args.plot, f"bench serve: {bench.model}, {len(prompts)} requests", bench.results)
        print(f"wrote {args.plot}")
    return 0 if summary["failed"] == 0 else 1
