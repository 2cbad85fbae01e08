"""``heteroserve bench``: offline throughput and latency of an in-process engine.

Workloads (token ids drawn at random from the tokenizer's non-special vocabulary, seeded):

- ``random``: ``--num-prompts`` prompts of ``--input-len`` tokens each.
- ``shared-prefix``: ``--num-groups`` groups, each with its own ``--prefix-len``-token prefix;
  every prompt is its group's prefix followed by ``--input-len`` unique tokens (the radix
  cache should turn most prefix tokens into cache hits).

Every request is sent at once (or at most ``--max-concurrency`` at a time) with streaming on,
so time to first token (TTFT) and inter-token latency (ITL, gaps between streamed chunks) are
measured as a client sees them. A warm-up request runs first and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from heteroserve.server.args import add_server_args, server_args_from_namespace

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``bench`` subcommand."""
    p = sub.add_parser("bench", help="offline throughput/latency benchmark of an in-process engine")
    p.add_argument("--workload", choices=("random", "shared-prefix"), default="random")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="unique prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="max_new_tokens per request")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: number of prefixes")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens per prefix")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly --output-len tokens (default on)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=1, help="workload seed")
    p.add_argument("--output-json", default=None, metavar="PATH")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="compare decode throughput with and without this JSON schema (inline "
                        "JSON or @file) at batch 1 and 64, instead of --workload")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write TTFT / ITL / E2E distributions as a PNG (needs matplotlib)")
    add_server_args(p)
    p.set_defaults(run=run)
    from heteroserve.server import bench_serve

    modes = p.add_subparsers(dest="bench_mode", metavar="{serve}",
                             help="`heteroserve bench serve --help`: load-test a running server "
                                  "over HTTP (without it: the offline benchmark)")
    bench_serve.add_parser(modes)


def make_workload(args: argparse.Namespace, vocab: list[int]) -> list[list[int]]:
    """Prompts (token id lists) for ``args.workload``; deterministic for ``args.seed``."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    rng = random.Random(args.seed)

    def sample(n: int) -> list[int]:
        return [rng.choice(vocab) for _ in range(n)]

    if args.workload == "random":
        return [sample(args.input_len) for _ in range(args.num_prompts)]
    if args.num_groups < 1 or args.prefix_len < 1:
        raise ValueError("--num-groups and --prefix-len must be >= 1")
    prefixes = [sample(args.prefix_len) for _ in range(args.num_groups)]
    return [prefixes[i % args.num_groups] + sample(args.input_len)
            for i in range(args.num_prompts)]


@dataclass
class RequestRecord:
    """Client-side timings of one request (seconds, ``time.perf_counter`` based)."""

    input_len: int
    start: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    end: float = 0.0
    output_len: int = 0
    cached_tokens: int = 0
    error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(records: list[RequestRecord], duration: float, peak_kv: float | None
              ) -> dict[str, Any]:
    """Throughput and latency metrics over finished ``records`` (times in ms)."""
    ok = [r for r in records if r.error is None]
    inp = sum(r.input_len for r in ok)
    out = sum(r.output_len for r in ok)
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    itls = [x * 1000 for r in ok for x in r.itl]
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "total_input_tokens": inp, "total_output_tokens": out,
        "request_throughput": len(ok) / duration, "input_throughput": inp / duration,
        "output_throughput": out / duration, "total_throughput": (inp + out) / duration,
        "ttft_ms_mean": statistics.fmean(ttfts) if ttfts else float("nan"),
        "ttft_ms_p50": _percentile(ttfts, 0.5), "ttft_ms_p99": _percentile(ttfts, 0.99),
        "itl_ms_mean": statistics.fmean(itls) if itls else float("nan"),
        "itl_ms_p50": _percentile(itls, 0.5), "itl_ms_p99": _percentile(itls, 0.99),
        "cache_hit_rate": (sum(r.cached_tokens for r in ok) / inp) if inp else 0.0,
        "peak_kv_usage": peak_kv,  # fraction of the KV pool held by requests (not the cache)
    }


async def _one(engine: Any, ids: list[int], params: dict[str, Any], rec: RequestRecord,
               sem: asyncio.Semaphore | None, bar: Any) -> None:
    from heteroserve.core.runtime.io_struct import GenerateRequest

    async def body() -> None:
        rec.start = last = time.perf_counter()
        seen = 0
        try:
            stream = await engine.client.generate(
                GenerateRequest(input_ids=ids, sampling_params=params, stream=True))
            async for out in stream:
                now = time.perf_counter()
                if out.token_ids:
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    else:
                        rec.itl.append(now - last)
                    last = now
                    seen += len(out.token_ids)
                if out.finished:
                    rec.output_len = seen
                    rec.cached_tokens = out.usage.cached_tokens
        except Exception as exc:  # count, do not abort the whole run
            rec.error = str(exc)
        rec.end = time.perf_counter()
        if bar is not None:
            bar.update(1)

    if sem is None:
        await body()
    else:
        async with sem:
            await body()


def _peak_kv_usage(engine: Any) -> float | None:
    """The scheduler's running maximum of KV use (its snapshot rides with the last output)."""
    peak = engine.get_stats().get("peak_kv_usage")
    return float(peak) if isinstance(peak, (int, float)) else None


async def _run_all(engine: Any, prompts: list[list[int]], params: dict[str, Any],
                   args: argparse.Namespace) -> tuple[list[RequestRecord], float, float | None]:
    from tqdm import tqdm

    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    records = [RequestRecord(len(p)) for p in prompts]
    bar = None if args.disable_tqdm else tqdm(total=len(prompts), desc="bench", unit="req")
    start = time.perf_counter()
    await asyncio.gather(*(_one(engine, p, params, r, sem, bar)
                           for p, r in zip(prompts, records)))
    duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return records, duration, _peak_kv_usage(engine)


def _print_table(m: dict[str, Any], args: argparse.Namespace) -> None:
    rows = [
        ("workload", args.workload), ("completed / failed", f"{m['completed']} / {m['failed']}"),
        ("duration (s)", f"{m['duration_s']:.2f}"),
        ("input / output tokens", f"{m['total_input_tokens']} / {m['total_output_tokens']}"),
        ("request throughput (req/s)", f"{m['request_throughput']:.2f}"),
        ("input throughput (tok/s)", f"{m['input_throughput']:.1f}"),
        ("output throughput (tok/s)", f"{m['output_throughput']:.1f}"),
        ("total throughput (tok/s)", f"{m['total_throughput']:.1f}"),
        ("TTFT p50 / p99 (ms)", f"{m['ttft_ms_p50']:.1f} / {m['ttft_ms_p99']:.1f}"),
        ("ITL p50 / p99 (ms)", f"{m['itl_ms_p50']:.2f} / {m['itl_ms_p99']:.2f}"),
        ("cache hit rate", f"{m['cache_hit_rate']:.1%}"),
        ("peak KV use", "n/a" if m["peak_kv_usage"] is None else f"{m['peak_kv_usage']:.1%}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("=" * (width + 20))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("=" * (width + 20))


def run(args: argparse.Namespace) -> int:
    """Build the workload, start an engine, run it, print the table, write ``--output-json``."""
    from heteroserve.core.engine import Engine

    server_args = server_args_from_namespace(args)
    kwargs = {k: v for k, v in vars(server_args).items() if k not in ("model_path", "platform")}
    params = {"max_new_tokens": args.output_len, "ignore_eos": args.ignore_eos,
              "temperature": args.temperature}
    with Engine(server_args.model_path, server_args.platform, **kwargs) as engine:
        special = set(engine.tokenizer.hf.all_special_ids)
        vocab = [i for i in range(engine.tokenizer.vocab_size) if i not in special]
        prompts = make_workload(args, vocab)
        warm = {**params, "max_new_tokens": min(4, args.output_len)}
        engine.generate(input_ids=random.Random(0).choices(vocab, k=8), sampling_params=warm)
        if args.json_schema:
            from heteroserve.server.bench_structured import run_structured

            structured = run_structured(engine, args, vocab, _run_all, summarize)
            if args.output_json:
                Path(args.output_json).write_text(json.dumps(structured, indent=2))
                print(f"wrote {args.output_json}")
            return 0
        records, duration, peak = asyncio.run(_run_all(engine, prompts, params, args))
        metrics = summarize(records, duration, peak)
        metrics["engine"] = {"platform": engine.info.platform, "device": engine.info.device,
                             "page_size": engine.info.page_size,
                             "max_total_tokens": engine.info.max_total_tokens}
    metrics["config"] = {k: getattr(args, k) for k in (
        "workload", "num_prompts", "input_len", "output_len", "num_groups", "prefix_len",
        "ignore_eos", "temperature", "max_concurrency", "seed", "model_path", "load_format")}
    _print_table(metrics, args)
    errors = sorted({r.error for r in records if r.error})
    for err in errors[:3]:
        print(f"error: {err}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(metrics, f, indent=2, default=str)
        print(f"wrote {args.output_json}")
    if args.plot:
        from heteroserve.server.bench_plot import plot_distributions

        ok = [r for r in records if r.error is None]
        plot_distributions(args.plot, f"bench (offline): {args.workload}, {len(ok)} requests", {
            "TTFT (ms)": [r.ttft * 1000 for r in ok if r.ttft is not None],
            "ITL (ms)": [x * 1000 for r in ok for x in r.itl],
            "E2E latency (ms)": [(r.end - r.start) * 1000 for r in ok]})
        print(f"wrote {args.plot}")
    return 0 if not errors else 1
