"""Every headline workload of issue 17 next to its floor, in one run (< 9 minutes on one H200):

    python benchmarks/bench_headline.py --out benchmarks/results/h200-latest.json
    python benchmarks/bench_headline.py --profile qwen3moe_decode1 --out "$OUT/h200-latest.json"
    python benchmarks/bench_headline.py --smoke --out /tmp/x/smoke.json   # tiny, cpu, seconds

Dummy bf16 weights, the in-process engine with its defaults (model runner + scheduler, random
token ids, greedy, ``ignore_eos``; chunked prefill of 8192), the ceilings measured in the same
run (roofline.py: a 4 GiB copy, an 8192^3 bf16 matmul). Workloads (value / floor / fraction):

  llama8b_decode1       Llama-3.1-8B batch-1 decode tok/s / weight bytes over the copy
                        bandwidth (bench_llama8b.bench_decode1) / value over floor
  llama8b_offline       1024 x (1024 in / 256 out) total tok/s / bench_llama8b.workload_floor
  llama8b_prefill_8k, _32k, _100k
                        the median time to first token (s) of 5 / 3 / 1 fresh prompts
                        (``ttft_all_s``: each) / linear + causal attention FLOPs at the
                        measured matmul rate (floors.prefill_floor) / floor over value;
                        ``chunk_s`` holds the median prompt's chunk times (one sync per step)
  qwen3moe_decode1      Qwen3-30B-A3B batch-1 decode / active weights (3.04 B parameters,
                        floors.decode1_roofline) over the copy bandwidth
  qwen3moe_offline      512 x (1024 / 256) / floors.moe_offline_floor
  deepseek_v2_lite_decode1, gemma3_12b_decode1
                        optional (run while the run is under ``--optional-until-s``):
                        bench_models.bench_decode1 against its weights + KV roofline

Writes ``--out`` (``{"device", "date", "commit", "workloads": {name: {"value", "unit",
"floor", "fraction", "target"}}, "errors", "skipped", ...}``; rewritten after every workload so
a run cut short keeps what it measured; a workload that raises goes to ``errors``, the rest of
its model's workloads to ``skipped``, and the exit status is 1), one ``<stem>-<name>.json`` and
``<stem>-<name>.png`` per workload next to it, and ``<stem>.png`` (every fraction next to its
target). ``--profile NAME[,NAME]`` (or ``all``): when such a workload misses its target
(or has none), it runs again under torch.profiler (an offline workload
with one wave of ``max_running`` prompts) and its JSON gains ``profile``: the top kernels by
device time. Before each model but the first the ceilings are measured again and kept as
``ceilings_before_model`` (the floors use the start's): a drop there is the device slowing
under sustained load, or the process's state after an engine (on an H100 on 2026-12-06 the
copy rate read 2.60 TB/s after a freed engine, 3.01 at the start of a fresh process).
``--process-per-model`` runs each model in a fresh process instead, as a server runs one
model (:func:`run_per_model`); each then measures its ceilings first. Environment:
``HS_KERNELS``, ``HS_GRAPH_MAX_BS``, ``HS_CHUNKED_PREFILL`` (the engines' chunk, else
8192), ``HS_COMMIT`` (else ``git``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_llama8b  # noqa: E402
import bench_models  # noqa: E402
import floors  # noqa: E402
from bench_common import build_engine, free_engine, log, random_prompts, run_requests  # noqa: E402
from headline_report import plot_summary, plot_workload, profile_top_kernels  # noqa: E402
from roofline import copy_bandwidth, matmul_rate  # noqa: E402

if TYPE_CHECKING:
    from heteroserve.core.model_runner.runner import ModelRunner
    from heteroserve.core.scheduler.scheduler import Scheduler

MODELS = {"llama8b": HERE / "models" / "llama-3.1-8b",
          "qwen3moe": HERE / "models" / "qwen3-30b-a3b",
          "deepseek_v2_lite": HERE / "models" / "deepseek-v2-lite",
          "gemma3_12b": HERE / "models" / "gemma-3-12b"}
SMOKE_ARCHS = {"llama8b": "llama", "qwen3moe": "qwen3_moe", "deepseek_v2_lite": "deepseek_v2",
               "gemma3_12b": "gemma3"}
#: issue 17's "done means" (fraction of floor); None: no target
TARGETS = {"llama8b_decode1": 0.90, "llama8b_offline": 0.88, "llama8b_prefill_8k": 0.85,
           "llama8b_prefill_32k": 0.75, "llama8b_prefill_100k": 0.70,
           "qwen3moe_decode1": 0.65, "qwen3moe_offline": 0.75}
OPTIONAL = ("deepseek_v2_lite_decode1", "gemma3_12b_decode1")


@dataclass(frozen=True)
class Shapes:
    """Workload sizes: the real ones, or the cpu smoke run's."""

    decode_out: int = 256
    llama_offline: tuple[int, int, int] = (1024, 1024, 256)
    qwen_offline: tuple[int, int, int] = (512, 1024, 256)
    prefill: dict[str, int] = field(default_factory=lambda: {
        "8k": 8192, "32k": 32768, "100k": 100000})
    #: prompts per prefill row (fresh ones, no cached prefix); the row's value is their median
    prefill_repeats: dict[str, int] = field(default_factory=lambda: {
        "8k": 5, "32k": 3, "100k": 1})
    max_running: int = 256
    chunked_prefill: int = 8192


SMOKE = Shapes(decode_out=8, llama_offline=(6, 24, 6), qwen_offline=(6, 24, 6),
               prefill={"8k": 48, "32k": 96, "100k": 160},
               prefill_repeats={"8k": 3, "32k": 1, "100k": 1}, max_running=4, chunked_prefill=64)


@dataclass
class Run:
    """What every workload function needs."""

    runner: ModelRunner
    scheduler: Scheduler
    cfg: dict
    model_dir: Path
    ceilings: dict
    shapes: Shapes
    dtype_bytes: int


def _summary(value: float, unit: str, floor: float, fraction: float, **detail) -> dict:
    return {"value": value, "unit": unit, "floor": floor, "fraction": fraction, **detail}


def llama8b_decode1(r: Run) -> dict:
    d = bench_llama8b.bench_decode1(r.runner, r.scheduler, r.ceilings, r.shapes.decode_out)
    return _summary(d["tok_per_s"], "tok/s", d["roofline_tok_per_s"], d["fraction_of_roofline"],
                    detail=d)


def llama8b_offline(r: Run, waves: int | None = None) -> dict:
    n, inp, out = r.shapes.llama_offline
    n = n if waves is None else min(n, waves * r.shapes.max_running)
    d = bench_llama8b.bench_throughput(r.runner, r.scheduler, r.ceilings, n, inp, out,
                                       r.shapes.max_running, r.model_dir)
    return _summary(d["total_tok_per_s"], "total tok/s", d["floor"]["floor_total_tok_per_s"],
                    d["fraction_of_floor"], wall_s=d["elapsed_s"], floor_s=d["floor"]["floor_s"],
                    detail=d)


def _prefill(r: Run, label: str) -> dict:
    """The median time to first token of ``prefill_repeats[label]`` fresh prompts of the
    row's length, one at a time (each prompt's own seed: no radix-cache hit)."""
    length = r.shapes.prefill[label]
    vocab = r.runner.vocab_size
    runs = [run_requests(r.scheduler, random_prompts(1, length, vocab, length + i), 1,
                         sync_steps=True) for i in range(r.shapes.prefill_repeats.get(label, 1))]
    ttfts = [res["ttft_p50_s"] for res in runs]
    mid = sorted(range(len(runs)), key=lambda i: ttfts[i])[len(runs) // 2]
    floor = floors.prefill_floor(r.cfg, length, r.ceilings)
    ttft = ttfts[mid]
    return _summary(ttft, "s", floor["floor_s"], floor["floor_s"] / ttft, prompt_len=length,
                    ttft_all_s=ttfts, chunk_s=runs[mid]["step_s"], floor_detail=floor,
                    detail=runs[mid])


def prefill_warmup(r: Run) -> None:
    """One prompt of two chunks and a little more (JIT compilation of the extend kernels with
    and without a prefix, allocator growth)."""
    n = 2 * r.shapes.chunked_prefill + 100
    run_requests(r.scheduler, random_prompts(1, n, r.runner.vocab_size, 7), 1)


def qwen3moe_decode1(r: Run) -> dict:
    d = bench_models.bench_decode1(r.runner, r.scheduler, r.ceilings["copy_bandwidth_Bps"],
                                   128, r.shapes.decode_out)
    roof = floors.decode1_roofline(r.cfg, r.ceilings, r.dtype_bytes)
    return _summary(d["tok_per_s"], "tok/s", roof["roofline_tok_per_s"],
                    d["tok_per_s"] / roof["roofline_tok_per_s"], roofline=roof, detail=d)


def qwen3moe_offline(r: Run, waves: int | None = None) -> dict:
    n, inp, out = r.shapes.qwen_offline
    n = n if waves is None else min(n, waves * r.shapes.max_running)
    d = bench_models.bench_throughput(r.runner, r.scheduler, n, inp, out)
    floor = floors.moe_offline_floor(r.cfg, n, inp, out, r.ceilings, r.shapes.max_running,
                                     r.dtype_bytes)
    return _summary(d["total_tok_per_s"], "total tok/s", floor["floor_total_tok_per_s"],
                    floor["floor_s"] / d["elapsed_s"], wall_s=d["elapsed_s"],
                    floor_s=floor["floor_s"], floor_detail=floor, detail=d)


def models_decode1(r: Run) -> dict:
    d = bench_models.bench_decode1(r.runner, r.scheduler, r.ceilings["copy_bandwidth_Bps"],
                                   128, r.shapes.decode_out)
    return _summary(d["tok_per_s"], "tok/s", d["roofline_tok_per_s"], d["fraction_of_roofline"],
                    detail=d)


#: model -> [(workload name, function)] in run order
PLAN = {
    "llama8b": [("llama8b_decode1", llama8b_decode1),
                *[(f"llama8b_prefill_{k}", lambda r, k=k: _prefill(r, k))
                  for k in ("8k", "32k", "100k")],
                ("llama8b_offline", llama8b_offline)],
    "qwen3moe": [("qwen3moe_decode1", qwen3moe_decode1), ("qwen3moe_offline", qwen3moe_offline)],
    "deepseek_v2_lite": [("deepseek_v2_lite_decode1", models_decode1)],
    "gemma3_12b": [("gemma3_12b_decode1", models_decode1)],
}


def _commit() -> str:
    if os.environ.get("HS_COMMIT"):
        return os.environ["HS_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure_ceilings(platform: str, smoke: bool) -> dict:
    device = "cpu" if smoke else platform
    if smoke:  # one thread: its CPU time is the work's (see roofline.py)
        torch.set_num_threads(1)
        return {"copy_bandwidth_Bps": copy_bandwidth(32 << 20, 10, device),
                "matmul_flops": matmul_rate(384, 10, device, torch.float32)}
    ceilings = {"copy_bandwidth_Bps": copy_bandwidth(device=device),
                "matmul_flops": matmul_rate(device=device)}
    torch.cuda.empty_cache()  # the 8 GiB of copy buffers, before the KV pool is sized
    return ceilings


def engine_for(model: str, model_dir: Path, shapes: Shapes, platform: str, smoke: bool):
    dtype, fmt = ("float32", "auto") if smoke else ("bfloat16", "dummy")
    extra: dict = {"max_total_tokens": 4096} if smoke else {}
    if model == "llama8b":  # long prompts: the whole context, a pool that holds them
        extra["context_length"] = 2048 if smoke else 131072
    if model in ("llama8b", "qwen3moe"):
        graph_bs = int(os.environ.get("HS_GRAPH_MAX_BS", "256"))
        return build_engine(model_dir, platform=platform, dtype=dtype, load_format=fmt,
                            max_running_requests=shapes.max_running,
                            chunked_prefill_size=int(os.environ.get(
                                "HS_CHUNKED_PREFILL", shapes.chunked_prefill)),
                            mem_fraction_static=0.80, cuda_graph_max_bs=graph_bs, **extra)
    return (*bench_models.build(model_dir, platform, dtype, shapes.max_running, fmt),)


def record(result: dict, ceilings: dict, name: str, entry: dict, out: Path) -> dict:
    """Write ``<stem>-<name>.json`` (everything) and ``.png``; return the summary's entry."""
    stem = out.with_suffix("")
    Path(f"{stem}-{name}.json").write_text(json.dumps(
        {"device": result["device"], "date": result["date"], "commit": result["commit"],
         "ceilings": ceilings, "name": name, **entry}, indent=2, default=str))
    plot_workload(name, entry, result["device"], Path(f"{stem}-{name}.png"))
    summary = {k: entry[k] for k in ("value", "unit", "floor", "fraction", "target")}
    summary.update({k: entry[k] for k in ("wall_s", "floor_s", "chunk_s", "ttft_all_s")
                    if k in entry})
    if "profile" in entry:
        summary["profile_top"] = entry["profile"]["top"][:12]
    return summary


def wanted_workloads(spec: str) -> list[str]:
    """The workload names ``--workloads`` selects (names or model prefixes), in PLAN order."""
    every = [name for steps in PLAN.values() for name, _ in steps]
    return every if spec == "all" else [
        n for n in every if any(n == w or n.startswith(w + "_") for w in spec.split(","))]


def models_to_run(wanted: list[str], t_start: float, optional_until_s: float,
                  skipped: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """``(model, its wanted workloads)`` in PLAN order, for models with any; a model whose
    workloads are all optional and come after ``optional_until_s`` seconds goes to
    ``skipped`` instead."""
    for model, steps in PLAN.items():
        names = [n for n, _ in steps if n in wanted]
        if not names:
            continue
        elapsed = time.perf_counter() - t_start
        if all(n in OPTIONAL for n in names) and elapsed > optional_until_s:
            skipped.update(dict.fromkeys(names, f"optional, {elapsed:.0f} s into the run"))
            log(f"skipping {names}: {elapsed:.0f} s elapsed")
            continue
        yield model, names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "h200-latest.json"))
    ap.add_argument("--workloads", default="all",
                    help="comma-separated names (or model prefixes such as qwen3moe), or all")
    ap.add_argument("--profile", default="", help="NAME[,NAME] or all: profile a missed target")
    ap.add_argument("--optional-until-s", type=float, default=330.0,
                    help="start the optional workloads only before this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny random models on the cpu")
    ap.add_argument("--process-per-model", action="store_true",
                    help="each model's workloads in a fresh process of this script (as a "
                         "server runs one model); the summary merges them")
    a = ap.parse_args(argv)
    if a.process_per_model:
        return run_per_model(a)
    t_start = time.perf_counter()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shapes = SMOKE if a.smoke else Shapes()
    platform = os.environ.get("HS_PLATFORM", "cpu" if a.smoke else "cuda")
    if not a.smoke and not torch.cuda.is_available():
        print("bench_headline: no CUDA device (use --smoke for the cpu check)")
        return 1
    every = [name for steps in PLAN.values() for name, _ in steps]
    wanted = wanted_workloads(a.workloads)
    profiled = set(every if a.profile == "all" else [p for p in a.profile.split(",") if p])
    unknown = profiled - set(every)
    if unknown:
        ap.error(f"--profile: unknown workload(s) {sorted(unknown)}; choose from {every}")
    result: dict = {"device": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(),
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "commit": _commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
                    "platform": platform, "smoke": a.smoke,
                    "env": {k: os.environ[k] for k in bench_llama8b.ENV_KNOBS if k in os.environ},
                    "workloads": {}, "skipped": {}, "errors": {}, "seconds": {}}
    log("measuring ceilings")
    result["ceilings"] = ceilings = measure_ceilings(platform, a.smoke)
    log(f"copy {ceilings['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, "
        f"matmul {ceilings['matmul_flops'] / 1e9:.1f} GFLOP/s")

    def write() -> None:
        result["elapsed_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(result, indent=2, default=str))

    for model, _names in models_to_run(wanted, t_start, a.optional_until_s, result["skipped"]):
        steps = PLAN[model]
        if a.smoke:
            from heteroserve.core.models.tiny import build_tiny_model

            model_dir = build_tiny_model(out.parent / "tiny" / model, SMOKE_ARCHS[model])
        else:
            model_dir = MODELS[model]
        if result["workloads"]:  # the device after the models before (clocks, heat):
            # the floors keep the start's ceilings; these say how far the device drifted
            again = measure_ceilings(platform, a.smoke)
            result.setdefault("ceilings_before_model", {})[model] = again
            log(f"ceilings before {model}: copy {again['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, "
                f"matmul {again['matmul_flops'] / 1e9:.1f} GFLOP/s")
        log(f"building {model} ({model_dir.name})")
        t_phase = time.perf_counter()
        runner, sched, dispatch = engine_for(model, model_dir, shapes, platform, a.smoke)
        result["seconds"][f"build_{model}"] = time.perf_counter() - t_phase
        cfg = json.loads((model_dir / "config.json").read_text())
        dtype_bytes = next(runner.model.parameters()).element_size()
        run = Run(runner, sched, cfg, model_dir, ceilings, shapes, dtype_bytes)
        log(f"built {model}: kv pool {runner.max_total_tokens} tokens")
        warmed, failed = False, None
        for name, fn in steps:
            if name not in wanted:
                continue
            if failed:  # the engine may hold the failed workload's requests: do not reuse it
                result["skipped"][name] = f"after the error in {failed}"
                continue
            log(f"{name}")
            t_phase = time.perf_counter()
            try:
                if "prefill" in name and not warmed:
                    prefill_warmup(run)
                    warmed = True
                entry = fn(run)
            except Exception as exc:  # noqa: BLE001 - recorded, the other models still run
                failed = name
                result["errors"][name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed: {result['errors'][name]}")
                write()
                continue
            entry["target"] = TARGETS.get(name)
            entry["kernels"] = dispatch.summary()
            missed = entry["target"] is not None and entry["fraction"] < entry["target"]
            log(f"{name}: {entry['value']:.4g} {entry['unit']}, floor {entry['floor']:.4g}, "
                f"{100 * entry['fraction']:.1f}%" + (" (target missed)" if missed else ""))
            if name in profiled and (missed or entry["target"] is None):
                log(f"profiling {name}")
                again = (lambda: fn(run, waves=1)) if "offline" in name else (lambda: fn(run))
                entry["profile"] = profile_top_kernels(again, with_device=platform == "cuda")
                log(f"{name} profile: " + "; ".join(
                    f"{t['share']:.0%} {t['name'][:50]}" for t in entry["profile"]["top"][:3]))
            result["workloads"][name] = record(result, ceilings, name, entry, out)
            result["seconds"][name] = time.perf_counter() - t_phase  # warm-up and profile too
            write()
        platform_obj, device = runner.platform, runner.device
        del run, runner, sched, dispatch
        free_engine(platform_obj, device)
        log(f"freed {model}")
    plot_summary(result["workloads"], result["device"], out.with_suffix(".png"))
    write()
    log(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)"
        + (f"; errors in {sorted(result['errors'])}" if result["errors"] else ""))
    return 1 if result["errors"] else 0


def run_per_model(a: argparse.Namespace) -> int:
    """``--process-per-model``: this script once per model with that model's wanted
    workloads (same ``--out``, so the per-workload files land where a single run puts them),
    each in a fresh process that measures its own ceilings first; the summary at ``--out``
    merges their workloads, errors and skips, with each model's ceilings under
    ``ceilings_per_model`` (``ceilings``: the first model's). A process that ends without a
    summary is an error of its model. Returns 1 if any model had an error."""
    t_start = time.perf_counter()
    out = Path(a.out)
    merged: dict = {"process_per_model": True, "workloads": {}, "skipped": {}, "errors": {},
                    "seconds": {}, "ceilings_per_model": {}}
    for model, names in models_to_run(wanted_workloads(a.workloads), t_start,
                                      a.optional_until_s, merged["skipped"]):
        out.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--workloads",
               ",".join(names), "--profile", a.profile] + (["--smoke"] if a.smoke else [])
        log(f"{model}: a process of its own")
        rc = subprocess.run(cmd).returncode
        if not out.exists():
            merged["errors"][model] = f"the {model} process exited with {rc} and no summary"
            continue
        part = json.loads(out.read_text())
        for key in ("device", "date", "commit", "torch", "platform", "smoke", "env",
                    "ceilings"):
            merged.setdefault(key, part.get(key))
        merged["ceilings_per_model"][model] = part.get("ceilings")
        for key in ("workloads", "skipped", "errors", "seconds"):
            merged[key].update(part.get(key, {}))
    merged["command"] = " ".join(sys.argv)
    merged["elapsed_s"] = time.perf_counter() - t_start
    out.write_text(json.dumps(merged, indent=2, default=str))
    plot_summary(merged["workloads"], merged.get("device", "?"), out.with_suffix(".png"))
    log(f"wrote {out} ({merged['elapsed_s']:.0f} s, a process per model)"
        + (f"; errors in {sorted(merged['errors'])}" if merged["errors"] else ""))
    return 1 if merged["errors"] else 0


def main_tagged(argv: list[str], tags: dict[str, str]) -> int:
    """:func:`main` on ``argv`` (which must name ``--out``), then ``tags`` added to the
    summary JSON: how a side-by-side run (``prefill_cudnn_rule.py``, ``overlap_rule.py``)
    differs from the default."""
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", required=True)
    path = Path(out.parse_known_args(argv)[0].out)
    rc = main(argv)
    result = json.loads(path.read_text())
    result.update(tags)
    path.write_text(json.dumps(result, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
