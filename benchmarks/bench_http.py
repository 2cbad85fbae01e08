"""Serving through HTTP next to the offline Engine, in one run (issue 22 item 8).

1. Starts ``heteroserve serve`` (a subprocess) with the model flags, waits for ``/health``, and
   at each concurrency level streams random-id prompts (``--input-len`` in, ``--output-len``
   out, ``ignore_eos``) over ``/v1/completions`` with ``heteroserve bench serve``'s client:
   tokens/s, SSE chunks with text per reply and per generated token, TTFT and inter-chunk gap
   p50/p99. Then stops the server.
2. Starts ``heteroserve.Engine`` with the same flags in this process and measures, on fresh
   prompts of the same shape:
   - TTFT at concurrency 1 (the first streamed output, ``--levels``' count for concurrency 1);
   - the decode step time at each level's batch: ``c`` prompts submitted at once with
     ``max_new_tokens=1`` take ``T1``, ``c`` others with ``max_new_tokens=O`` take ``TO``;
     step = ``(TO - T1) / (O - 1)`` (the prefill cancels out; all ``c`` decode in lockstep);
   - throughput: the largest level's prompt count at its concurrency (``async_generate``
     under a semaphore), total and output tokens/s.
3. Writes ``<out-dir>/<name>.json`` (device, date, commit, command, every number, the issue's
   targets evaluated) and ``<out-dir>/<name>.png``.

On the H200 (about 6 minutes, at most ``--budget-s`` 480 s plus start-ups; a model folder without
tokenizer gets a word-level tokenizer of the model's vocabulary built in a temporary folder, so
every generated token decodes to text). The image lacks the server's packages: on the host run
``bash benchmarks/http_wheels.sh`` (wheels into .whl/), then on the GPU machine, carrying .whl:

    bash benchmarks/gpu_session.sh http      # = python3 benchmarks/bench_http.py --out-dir $OUT

CPU smoke run (< 60 s): the same path with the default tiny model's config (dummy weights, a
word-level tokenizer), 16 in / 4 out: ``python benchmarks/bench_http.py --smoke``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform as host_platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from heteroserve.server.bench_serve import ClientConfig, LoadConfig, request_rows, run_benchmark
from heteroserve.server.bench_serve_data import BenchPrompt, WorkloadSpec, make_prompts
from heteroserve.server.bench_serve_metrics import summarize

if TYPE_CHECKING:
    from heteroserve.core.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_http_report import Level, evaluate_targets, level_table, plot  # noqa: E402
from word_tokenizer import build_word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GPU_MODEL = ROOT / "benchmarks" / "models" / "llama-3.1-8b"
GPU_LEVELS = "1:16,16:64,64:128,256:512"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_levels(text: str) -> list[Level]:
    """``"1:16,16:64"`` -> levels (concurrency:num_prompts). Raises ``ValueError``."""
    levels = []
    for part in text.split(","):
        try:
            c, n = (int(x) for x in part.split(":"))
        except ValueError:
            raise ValueError(f"--levels: {part!r} is not CONCURRENCY:NUM_PROMPTS") from None
        if c < 1 or n < 1:
            raise ValueError(f"--levels: {part!r} needs positive numbers")
        levels.append(Level(c, n))
    return levels


def model_flags(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The flags that both ``heteroserve serve`` and the offline Engine get."""
    model = Path(args.model_path) if args.model_path else None
    if model is None:  # --smoke: the default tiny model's config alone, as on the GPU
        from heteroserve.core.models.tiny import ensure_default_model

        model = tmp / "tiny-config"
        model.mkdir()
        shutil.copy(ensure_default_model() / "config.json", model / "config.json")
    flags = ["--model-path", str(model), "--platform", args.platform]
    if args.load_format:
        flags += ["--load-format", args.load_format]
    has_tokenizer = any((model / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tokenizer and "--tokenizer-path" not in args.engine_flags:
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        _log(f"building a {vocab}-token word-level tokenizer for {model}")
        flags += ["--tokenizer-path", str(build_word_tokenizer(tmp / "tokenizer", vocab))]
    return flags + shlex.split(args.engine_flags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``heteroserve serve`` on a free loopback port; log in ``log_path``."""

    def __init__(self, flags: list[str], log_path: Path, startup_timeout: float) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "heteroserve.server.cli", "serve", *flags,
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
               "--log-level", "warning", "--disable-access-log"]
        t0 = time.perf_counter()
        # its own process group: stop() can wait for the engine process too (device memory)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = t0 + startup_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy after {startup_timeout}s: {self.tail()}")

    def tail(self, n: int = 15) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int:
        """SIGTERM, then wait (bounded) until every process of its group is gone, so that the
        offline Engine finds the device memory free; SIGKILL whatever is left after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 30
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return int(self.proc.returncode)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group ``pgid`` exists (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def prompts(n: int, args: argparse.Namespace, vocab: int, seed: int, out: int | None = None
            ) -> list[BenchPrompt]:
    """``n`` random-id prompts. Every phase uses its own seed: random ids of different seeds
    share no prefix (almost surely), so no phase finds another's prompts in the radix cache."""
    return make_prompts(WorkloadSpec("random-ids", n, args.input_len, out or args.output_len,
                                     vocab_size=vocab, seed=seed))


def run_http(args: argparse.Namespace, flags: list[str], levels: list[Level], vocab: int,
             tmp: Path, report: dict) -> None:
    server = Server(flags, tmp / "server.log", args.startup_timeout)
    http: dict = {"startup_s": server.startup_s, "levels": []}
    report["http"] = http
    try:
        cfg = ClientConfig(base_url=server.url, request_timeout_s=args.level_timeout)
        top = max(lv.concurrency for lv in levels)
        warm = prompts(min(top, 32), args, vocab, seed=999, out=8)
        asyncio.run(run_benchmark(cfg, LoadConfig(max_concurrency=top, warmup_requests=1,
                                                  timeout_s=args.level_timeout), warm))
        for i, lv in enumerate(levels):
            left = args.deadline - args.offline_reserve - time.monotonic()
            if left < 10:
                http.setdefault("skipped", []).append(f"concurrency {lv.concurrency}: budget")
                _log(f"http: concurrency {lv.concurrency} skipped (--budget-s)")
                continue
            _log(f"http: concurrency {lv.concurrency}, {lv.num_prompts} requests")
            load = LoadConfig(max_concurrency=lv.concurrency, warmup_requests=0,
                              timeout_s=min(args.level_timeout, left))
            run = asyncio.run(run_benchmark(cfg, load, prompts(lv.num_prompts, args, vocab,
                                                               seed=1000 + i)))
            m = summarize(run.results, run.duration_s)
            http["levels"].append({"concurrency": lv.concurrency, "num_prompts": lv.num_prompts,
                                   "timeout_s": load.timeout_s, "client_cpu_s": run.client_cpu_s,
                                   "summary": m, "requests": request_rows(run.results)})
            _log(f"  {m['output_throughput']:.0f} out tok/s, "
                 f"{m['chunks_with_text_per_token']} chunks/token, TTFT p50 "
                 f"{m['ttft_ms_p50']} ms, gap p50 {m['itl_ms_p50']} ms, errors {m['errors']}")
    finally:
        http["exit_code"] = server.stop()
        http["log_tail"] = server.tail(30)


def run_offline(args: argparse.Namespace, flags: list[str], levels: list[Level], vocab: int,
                report: dict) -> None:
    import heteroserve
    from heteroserve.server.args import add_server_args, server_args_from_namespace

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    sargs = server_args_from_namespace(parser.parse_args(flags))
    kwargs = {k: v for k, v in vars(sargs).items() if k not in ("model_path", "platform")}
    kwargs["log_level"] = "warning"
    t0 = time.perf_counter()
    offline: dict = {}
    report["offline"] = offline
    with heteroserve.Engine(sargs.model_path, sargs.platform, **kwargs) as engine:
        offline["startup_s"] = time.perf_counter() - t0
        offline["engine"] = {k: getattr(engine.info, k, None) for k in (
            "platform", "device", "page_size", "max_total_tokens", "max_running_requests")}
        sp = {"temperature": 0.0, "ignore_eos": True}
        top = max(lv.concurrency for lv in levels)
        warm = [p.prompt for p in prompts(min(top, 32), args, vocab, seed=1999)]
        engine.generate(input_ids=warm, sampling_params={**sp, "max_new_tokens": 8})

        n1 = next((lv.num_prompts for lv in levels if lv.concurrency == 1), 8)
        ttfts = asyncio.run(_offline_ttfts(engine, prompts(n1, args, vocab, seed=3000), sp))
        offline["ttft_c1"] = {"num_prompts": n1, "ttft_ms_p50": _pct(ttfts, 50),
                              "ttft_ms_p99": _pct(ttfts, 99), "ttft_ms": ttfts}
        _log(f"offline: TTFT p50 at concurrency 1 {offline['ttft_c1']['ttft_ms_p50']:.2f} ms")

        steps = offline["decode_step"] = {}
        out_len = args.output_len
        for i, lv in enumerate(levels):
            c = lv.concurrency
            if time.monotonic() > args.deadline:
                offline.setdefault("skipped", []).append(f"decode step at batch {c}: budget")
                continue
            a = [p.prompt for p in prompts(c, args, vocab, seed=2000 + 2 * i)]
            b = [p.prompt for p in prompts(c, args, vocab, seed=2001 + 2 * i)]
            s = time.perf_counter()
            engine.generate(input_ids=a, sampling_params={**sp, "max_new_tokens": 1})
            t1 = time.perf_counter() - s
            s = time.perf_counter()
            outs = engine.generate(input_ids=b, sampling_params={**sp, "max_new_tokens": out_len})
            t_out = time.perf_counter() - s
            tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
            steps[str(c)] = {"batch": c, "t_max_new_1_s": t1, "t_max_new_out_s": t_out,
                             "step_ms": (t_out - t1) / max(out_len - 1, 1) * 1000,
                             "batch_output_tok_s": tokens / t_out}
            _log(f"offline: batch {c}: step {steps[str(c)]['step_ms']:.2f} ms")

        big = max(levels, key=lambda lv: (lv.concurrency, lv.num_prompts))
        if time.monotonic() > args.deadline:
            offline.setdefault("skipped", []).append("throughput: budget")
            return
        work = prompts(big.num_prompts, args, vocab, seed=4000)
        offline["throughput"] = asyncio.run(_offline_throughput(engine, work, big.concurrency,
                                                                sp))
        _log(f"offline: throughput {offline['throughput']}")


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


async def _offline_ttfts(engine: Engine, work: list[BenchPrompt], sp: dict) -> list[float]:
    ttfts = []
    for p in work:
        start = time.perf_counter()
        first = None
        stream = await engine.async_generate(input_ids=p.prompt, stream=True,
                                             sampling_params={**sp, "max_new_tokens": 2})
        async for chunk in stream:
            if first is None and chunk["output_ids"]:
                first = (time.perf_counter() - start) * 1000
        ttfts.append(first)
    return [t for t in ttfts if t is not None]


async def _offline_throughput(engine: Engine, work: list[BenchPrompt], concurrency: int,
                              sp: dict) -> dict:
    sem = asyncio.Semaphore(concurrency)
    out_tokens = 0

    async def one(p: BenchPrompt) -> None:
        nonlocal out_tokens
        async with sem:
            out = await engine.async_generate(input_ids=p.prompt, sampling_params={
                **sp, "max_new_tokens": p.output_len})
            out_tokens += out["meta_info"]["completion_tokens"]

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in work))
    dur = time.perf_counter() - start
    inp = sum(p.input_len for p in work)
    return {"num_prompts": len(work), "concurrency": concurrency, "duration_s": dur,
            "output_tokens": out_tokens, "output_throughput": out_tokens / dur,
            "total_throughput": (inp + out_tokens) / dur}


def device_name(platform: str) -> str:
    if platform in ("cuda", "auto"):
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except ImportError:
            pass
    return host_platform.processor() or host_platform.machine()


def git_commit() -> str:
    """``$HS_COMMIT`` when set (the device machine's copy of the tree carries the base
    commit's .git with the session's work as uncommitted changes), else git's HEAD."""
    if os.environ.get("HS_COMMIT"):
        return os.environ["HS_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "core", "server", "platforms"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HS_COMMIT", "unknown")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, the default tiny model, 16 in / 4 out, levels 1:2,2:4 (< 60 s)")
    ap.add_argument("--model-path", default=None,
                    help=f"model folder (default: {GPU_MODEL.relative_to(ROOT)}; --smoke: the "
                         "default tiny model's config.json alone)")
    ap.add_argument("--platform", default=None, help="default cuda; --smoke: cpu")
    ap.add_argument("--load-format", default=None, help="default dummy")
    ap.add_argument("--engine-flags", default=None,
                    help="more `heteroserve serve` flags, also given to the offline Engine "
                         "(default: '--dtype bfloat16'; --smoke: '--max-total-tokens 4096')")
    ap.add_argument("--input-len", type=int, default=None, help="default 1024; --smoke: 16")
    ap.add_argument("--output-len", type=int, default=None, help="default 256; --smoke: 4")
    ap.add_argument("--levels", default=None,
                    help=f"CONCURRENCY:NUM_PROMPTS,... (default {GPU_LEVELS}; --smoke: 1:2,2:4)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or str(ROOT / "benchmarks" /
                                                                      "results"))
    ap.add_argument("--name", default=None, help="file stem (default: http_serving_<device>)")
    ap.add_argument("--level-timeout", type=float, default=120.0, metavar="SECONDS",
                    help="each HTTP level ends after this long")
    ap.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="HTTP levels and offline steps that would start after this many seconds "
                         "are skipped (recorded under 'skipped')")
    ap.add_argument("--offline-reserve-s", dest="offline_reserve", type=float, default=150.0,
                    help="seconds of --budget-s kept for the offline Engine")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)
    smoke = {"platform": "cpu", "load_format": "dummy", "engine_flags": "--max-total-tokens 4096",
             "input_len": 16, "output_len": 4, "levels": "1:2,2:4"}
    gpu = {"model_path": str(GPU_MODEL), "platform": "cuda", "load_format": "dummy",
           "engine_flags": "--dtype bfloat16", "input_len": 1024, "output_len": 256,
           "levels": GPU_LEVELS}
    for key, value in (smoke if a.smoke else gpu).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.input_len < 1 or a.output_len < 2:
        raise SystemExit("bench_http: --input-len must be >= 1 and --output-len >= 2")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = parse_levels(args.levels)
    device = device_name(args.platform)
    name = args.name or ("http_serving_smoke" if args.smoke else "http_serving_" + "".join(
        ch if ch.isalnum() else "_" for ch in device.lower()).strip("_"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    report: dict = {
        "device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "commit": git_commit(),
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "workload": {"dataset": "random-ids", "input_len": args.input_len,
                     "output_len": args.output_len, "ignore_eos": True, "temperature": 0.0,
                     "endpoint": "/v1/completions, stream, include_usage",
                     "levels": [vars(lv) for lv in levels]},
        "step_time_method": "offline Engine: c prompts at once with max_new_tokens=1 take T1, c "
                            "others with max_new_tokens=O take TO; step = (TO-T1)/(O-1)",
        "ttft_method": "HTTP: send to first SSE event with text; offline: async_generate(stream)"
                       " call to first chunk with output ids, concurrency 1",
    }

    def save() -> None:
        rows = level_table(report, levels)
        report["table"] = rows
        report["targets"] = evaluate_targets(report, rows, levels)
        json_path.write_text(json.dumps(report, indent=2, default=str))

    t0 = time.perf_counter()
    args.deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        flags = model_flags(args, Path(tmp))
        report["model_flags"] = flags
        vocab = json.loads((Path(flags[1]) / "config.json").read_text())["vocab_size"]
        try:
            run_http(args, flags, levels, vocab, Path(tmp), report)
        finally:
            save()
        _log(f"http phase done at {time.perf_counter() - t0:.0f} s")
        run_offline(args, flags, levels, vocab, report)
    report["wall_s"] = time.perf_counter() - t0
    save()
    for row in report["table"]:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    print(json.dumps(report["targets"]))
    _log(f"wrote {json_path}")
    if not args.no_plot:
        plot(png_path, report, report["table"])
        _log(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
