"""heteroserve on the cpu platform against HF transformers ``generate``, side by side (issue 21).

    python benchmarks/bench_cpu.py --repeats 10 --out benchmarks/results/cpu_bench.json

For each case (model, dtype, batch) it alternates heteroserve and HF runs on the same random-
weight Llama (``cpu_models.py``): ``batch`` prompts of 128 random tokens, 64 new tokens,
greedy, ``ignore_eos``. A run's tok/s is its generated tokens over its wall time (prefill
included) for both engines; tokens per CPU-second of the process are reported next to it
(steadier where other jobs take the cores). It reports the median of ``--repeats`` runs per engine and their
ratio, heteroserve's median decode step, and, measured in the same run, the machine's matvec
bandwidth (a bf16 matrix-vector product over a 128 MiB weight, plain and oneDNN-packed; the
faster counts) and GEMM rate (bf16 and fp32), from which the batch-1 memory roofline of each
model follows: the bytes a decode step reads (every weight but the embedding table, of which
one row, plus the KV cache at the mean decode context) over the matvec bandwidth. The host's memory bandwidth drifts (readings
of 20-40 GB/s on one VM within an hour), so a batch-1 case's roofline uses the median of
readings taken right before each of its heteroserve runs (all kept in the JSON), not the one
reading at the start. The machine may be shared with other jobs: the load average before and
after is recorded, medians absorb part of the noise. Writes JSON and a PNG plot next to it.
``--torch-compile`` runs heteroserve with ``--enable-torch-compile`` (compiled on its warm-up
run, outside the timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import active_weight_bytes, kv_bytes_per_token  # noqa: E402
from cpu_models import build_engine, model_dir, random_prompts  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 128, 64
CASES = (("tiny", "float32", 1), ("tiny", "float32", 16), ("small", "bfloat16", 1),
         ("small", "bfloat16", 16), ("small", "float32", 1), ("small", "float32", 16))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _median_time(fn, iters: int, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def matvec_bandwidth() -> dict[str, float]:
    """Bytes/s of weight read by a bf16 ``[1, K] x [N, K]^T`` product over 128 MiB of weight."""
    n, k = 8192, 8192
    w = torch.randn(n, k).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    out = {"plain_Bps": w.numel() * 2 / _median_time(lambda: F.linear(x, w), 5)}
    if torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        out["onednn_packed_Bps"] = w.numel() * 2 / _median_time(
            lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 5)
    out["matvec_Bps"] = max(out.values())
    return out


def gemm_rate() -> dict[str, float]:
    """FLOP/s of a 1024^3 matrix product, bf16 and fp32."""
    n = 1024
    rates = {}
    for name, dtype in DTYPES.items():
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        rates[f"{name}_flops"] = 2 * n ** 3 / _median_time(lambda: a @ b, 3)
    return rates


def run_heteroserve(scheduler, prompts: list[list[int]], tag: str) -> dict[str, float]:
    """One greedy run; wall time and the median decode step (steps after the first token)."""
    from heteroserve.core.scheduler import Req
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    t0, c0 = time.perf_counter(), time.process_time()
    for i, ids in enumerate(prompts):
        sp = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        scheduler.add_request(Req(rid=f"{tag}-{i}", input_ids=ids, sampling_params=sp))
    tokens, step_times, first = 0, [], None
    while scheduler.has_work():
        s0 = time.perf_counter()
        produced = sum(len(o.new_token_ids) for o in scheduler.step())
        if first is not None and produced == len(prompts):
            step_times.append(time.perf_counter() - s0)
        if produced and first is None:
            first = time.perf_counter()
        tokens += produced
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / cpu, "tokens": tokens,
            "decode_step_s": statistics.median(step_times) if step_times else float("nan")}


def run_hf(model, prompts: list[list[int]]) -> dict[str, float]:
    ids = torch.tensor(prompts)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             pad_token_id=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / cpu, "tokens": tokens}


def run_case(name: str, dtype: str, batch: int, repeats: int, matvec_Bps: float,
             cpu_threads: str | None, torch_compile: bool = False) -> dict:
    import transformers

    # --cpu-threads sizes torch's pool for the whole process: HF runs with the same threads
    runner, scheduler = build_engine(name, dtype, max_running=max(16, batch),
                                     cpu_threads=cpu_threads, torch_compile=torch_compile)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir(name)), dtype=DTYPES[dtype]).eval()
    prompts = random_prompts(batch, PROMPT_LEN, runner.vocab_size, seed=batch)
    run_heteroserve(scheduler, prompts[:1], "warm")
    run_hf(hf, prompts[:1])
    hs_runs, hf_runs, readings = [], [], []
    for r in range(repeats):  # interleaved; the order flips every repeat
        order = ("hs", "hf") if r % 2 == 0 else ("hf", "hs")
        for engine in order:
            if engine == "hs":
                if batch == 1:  # the ceiling next to the run it bounds
                    readings.append(matvec_bandwidth()["matvec_Bps"])
                hs_runs.append(run_heteroserve(scheduler, prompts, f"r{r}"))
            else:
                hf_runs.append(run_hf(hf, prompts))
    hs_tps = statistics.median(r["tok_per_s"] for r in hs_runs)
    hf_tps = statistics.median(r["tok_per_s"] for r in hf_runs)
    step_s = statistics.median(r["decode_step_s"] for r in hs_runs)
    hs_cpu = statistics.median(r["tok_per_cpu_s"] for r in hs_runs)
    hf_cpu = statistics.median(r["tok_per_cpu_s"] for r in hf_runs)
    weight_bytes = runner.weight_bytes()
    # what one decode step of one sequence must read: weights (one embedding row) + its KV;
    # counted on an eager engine (a compiled one released its modules' copies of the linears)
    counted = build_engine(name, dtype, max_running=1)[0] if torch_compile else runner
    read_bytes = active_weight_bytes(counted) + kv_bytes_per_token(runner) * (
        PROMPT_LEN + NEW_TOKENS // 2)
    case_Bps = statistics.median(readings) if readings else matvec_Bps
    roofline_step_s = read_bytes / case_Bps
    result = {"model": name, "dtype": dtype, "batch": batch,
              "heteroserve_tok_per_s": hs_tps, "hf_tok_per_s": hf_tps, "ratio": hs_tps / hf_tps,
              # tokens per second of this process's CPU time (all its threads): less sensitive
              # than wall time to other jobs taking the cores, but it counts spin-waiting
              "heteroserve_tok_per_cpu_s": hs_cpu, "hf_tok_per_cpu_s": hf_cpu,
              "cpu_time_ratio": hs_cpu / hf_cpu,
              "torch_compile": torch_compile,
              "heteroserve_decode_step_s": step_s, "weight_bytes": weight_bytes,
              "decode_read_bytes": read_bytes,
              "roofline_decode_step_s": roofline_step_s,
              "matvec_Bps": case_Bps, "matvec_readings_Bps": readings,
              "fraction_of_roofline": roofline_step_s / step_s if batch == 1 else None,
              "heteroserve_runs": [r["tok_per_s"] for r in hs_runs],
              "hf_runs": [r["tok_per_s"] for r in hf_runs]}
    print(f"{name} {dtype} batch {batch}: heteroserve {hs_tps:.1f} tok/s, HF {hf_tps:.1f} "
          f"tok/s, ratio {hs_tps / hf_tps:.2f} (per CPU-second {hs_cpu / hf_cpu:.2f}), "
          f"decode step {step_s * 1e3:.2f} ms "
          f"(roofline {roofline_step_s * 1e3:.2f} ms at {case_Bps / 1e9:.1f} GB/s)", flush=True)
    return result


def _features() -> dict[str, str]:
    try:  # absent before issue 21, when this script measures the older code for comparison
        from heteroserve.platforms.cpu.features import detect_cpu_features
    except ImportError:
        return {}
    return detect_cpu_features().describe()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['dtype']}\nbatch {r['batch']}" for r in results]
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    ax.bar([x - width / 2 for x in xs], [r["heteroserve_tok_per_s"] for r in results], width,
           label="heteroserve")
    ax.bar([x + width / 2 for x in xs], [r["hf_tok_per_s"] for r in results], width,
           label="HF transformers generate")
    for x, r in zip(xs, results):
        ax.annotate(f"{r['ratio']:.2f}x", (x, max(r["heteroserve_tok_per_s"], r["hf_tok_per_s"])),
                    ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("generated tok/s (median, log scale)")
    ax.set_title(f"cpu platform, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens (shared machine)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default="all", help="comma list of model:dtype:batch, or all")
    ap.add_argument("--cpu-threads", default=None,
                    help="heteroserve's --cpu-threads (also what HF runs with); default auto")
    ap.add_argument("--torch-compile", action="store_true",
                    help="heteroserve with --enable-torch-compile (inductor with freezing)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_bench.json"))
    a = ap.parse_args()
    if a.cpu_threads is not None and a.cpu_threads.isdigit():
        torch.set_num_threads(int(a.cpu_threads))  # the ceilings below run with it too
    cases = CASES if a.cases == "all" else tuple(
        (m, d, int(b)) for m, d, b in (c.split(":") for c in a.cases.split(",")))
    load_before = os.getloadavg()
    bandwidth, rates = matvec_bandwidth(), gemm_rate()
    print(f"matvec {bandwidth['matvec_Bps'] / 1e9:.1f} GB/s, GEMM bf16 "
          f"{rates['bfloat16_flops'] / 1e9:.0f} GFLOP/s, fp32 {rates['float32_flops'] / 1e9:.0f} "
          "GFLOP/s", flush=True)
    results = [run_case(m, d, b, a.repeats, bandwidth["matvec_Bps"], a.cpu_threads,
                        a.torch_compile) for m, d, b in cases]
    report = {
        "benchmark": "bench_cpu", "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "repeats": a.repeats, "statistic": "median", "interleaved": True,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": host_platform.processor() or host_platform.machine(),
                    "features": _features(),
                    "shared_with_other_jobs": True,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "matvec": bandwidth, "gemm": rates, "results": results,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    plot(results, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
