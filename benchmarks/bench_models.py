"""Batch-1 decode of the DeepSeek-V2-Lite and Gemma-3-12B shapes against their rooflines
(issue 20), plus DeepSeek-V2-Lite offline throughput; dummy bf16 weights, in-process engine
(model runner + scheduler, random token ids), the device ceilings measured in the same run.

    python benchmarks/bench_models.py --out-dir "$OUT"            # on one H200, < 8 min
    python benchmarks/bench_models.py --smoke --out-dir /tmp/x     # tiny shapes on the cpu

Roofline of batch-1 decode: the bytes one token must read, over the measured copy bandwidth.
``active_weight_bytes`` counts every weight a token reads: all dense weights, the LM head
(the whole embedding matrix when tied), one embedding row, and for routed experts only
``top_k / num_experts`` of them (DeepSeek-V2-Lite: 6 of 64) plus the shared experts (stored as
extra experts of the fused MoE, or as a separate MLP); ``kv_bytes`` adds the KV cache
read at the mean decode context. ``fraction_of_roofline`` uses weights + KV.
Writes ``models.json`` and ``models.png`` under ``--out-dir``. Environment: ``HS_KERNELS``
(comma-separated ``OP=IMPL`` overrides, e.g. ``mla_attention=torch_native``),
``HS_GRAPH_MAX_BS`` (largest captured decode batch, default 16), ``HS_PLATFORM``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import (  # noqa: E402
    active_weight_bytes, build_engine, kv_bytes_per_token, log as _log, random_prompts,
    run_requests,
)

MODELS = {"deepseek-v2-lite": HERE / "models" / "deepseek-v2-lite",
          "gemma-3-12b": HERE / "models" / "gemma-3-12b"}
SMOKE_ARCHS = {"deepseek-v2-lite": "deepseek_v2", "gemma-3-12b": "gemma3"}


def build(model_dir: Path, platform: str, dtype: str, max_running: int, load_format: str):
    return build_engine(model_dir, platform=platform, dtype=dtype, load_format=load_format,
                        max_running_requests=max_running, context_length=4096,
                        mem_fraction_static=0.85,
                        cuda_graph_max_bs=int(os.environ.get("HS_GRAPH_MAX_BS", "16")))


def bench_decode1(runner, scheduler, bandwidth: float | None, prompt: int, output: int) -> dict:
    run_requests(scheduler, random_prompts(1, 32, runner.vocab_size, 1), 8)  # warm-up
    res = run_requests(scheduler, random_prompts(1, prompt, runner.vocab_size, 2), output)
    tok_s = 1.0 / res["itl_p50_s"]
    weights = active_weight_bytes(runner)
    kv = kv_bytes_per_token(runner) * (prompt + output // 2)
    out = {"tok_per_s": tok_s, "active_weight_bytes": weights, "total_weight_bytes":
           sum(p.numel() * p.element_size() for p in runner.model.parameters()),
           "kv_bytes_at_mean_context": kv, "prompt_len": prompt, "output_len": output, **res}
    if bandwidth:
        out["roofline_tok_per_s"] = bandwidth / (weights + kv)
        out["roofline_weights_only_tok_per_s"] = bandwidth / weights
        out["fraction_of_roofline"] = tok_s / out["roofline_tok_per_s"]
    return out


def bench_throughput(runner, scheduler, n: int, inp: int, out: int) -> dict:
    run_requests(scheduler, random_prompts(4, 64, runner.vocab_size, 3), 8)  # warm-up
    res = run_requests(scheduler, random_prompts(n, inp, runner.vocab_size, 4), out)
    return {"num_prompts": n, "input_len": inp, "output_len": out,
            "total_tok_per_s": n * (inp + out) / res["elapsed_s"],
            "output_tok_per_s": n * out / res["elapsed_s"], **res}


def plot(result: dict, path: Path) -> bool:
    """Bars of measured vs roofline tok/s per model; False (no plot) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in result["models"] if "decode1" in result["models"][m]]
    got = [result["models"][m]["decode1"]["tok_per_s"] for m in names]
    roof = [result["models"][m]["decode1"].get("roofline_tok_per_s", 0.0) for m in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], got, 0.4, label="heteroserve")
    ax.bar([x + 0.2 for x in xs], roof, 0.4, label="roofline (weights + KV)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("batch-1 decode tok/s")
    ax.set_title(f"batch-1 decode, {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "bench-models"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workloads", default="decode1,throughput",
                    help="decode1 (both models), throughput (DeepSeek-V2-Lite only)")
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random models of the same architectures on the cpu (checks "
                         "the script; no roofline)")
    a = ap.parse_args()
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    platform = os.environ.get("HS_PLATFORM", "cpu" if a.smoke else "cuda")
    if not a.smoke and not torch.cuda.is_available():
        print("bench_models: no CUDA device (use --smoke for the cpu check)")
        return 0
    result: dict = {"device": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(),
                    "torch": torch.__version__, "platform": platform, "models": {},
                    "kernels_env": os.environ.get("HS_KERNELS", ""),
                    "graph_max_bs_env": os.environ.get("HS_GRAPH_MAX_BS", "16")}
    bandwidth = None
    if not a.smoke:
        from roofline import copy_bandwidth

        bandwidth = copy_bandwidth()
        result["copy_bandwidth_Bps"] = bandwidth
        _log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    wl = a.workloads.split(",")
    for name in a.models.split(","):
        if a.smoke:
            from heteroserve.core.models.tiny import build_tiny_model

            model_dir, dtype, fmt = build_tiny_model(out_dir / "tiny" / name, SMOKE_ARCHS[name]), \
                "float32", "auto"
        else:
            model_dir, dtype, fmt = MODELS[name], "bfloat16", "dummy"
        runner, sched, dispatch = build(model_dir, platform, dtype, a.num_prompts, fmt)
        entry: dict = {"config": json.loads((model_dir / "config.json").read_text()),
                       "kernels": dispatch.summary()}
        result["models"][name] = entry
        if "decode1" in wl:
            entry["decode1"] = d = bench_decode1(runner, sched, bandwidth, 128,
                                                 16 if a.smoke else 256)
            _log(f"{name} decode1 {d['tok_per_s']:.1f} tok/s"
                 + (f", {100 * d['fraction_of_roofline']:.1f}% of roofline "
                    f"{d['roofline_tok_per_s']:.1f}" if bandwidth else ""))
        if "throughput" in wl and name == "deepseek-v2-lite":
            n, i, o = (8, 32, 8) if a.smoke else (a.num_prompts, a.input_len, a.output_len)
            entry["throughput"] = t = bench_throughput(runner, sched, n, i, o)
            _log(f"{name} throughput {t['total_tok_per_s']:.0f} tok/s total, "
                 f"{t['output_tok_per_s']:.0f} output tok/s")
        (out_dir / "models.json").write_text(json.dumps(result, indent=2, default=str))
        del runner, sched
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    plotted = plot(result, out_dir / "models.png")
    _log(f"wrote {out_dir / 'models.json'}" + (f" and {out_dir / 'models.png'}" if plotted
                                              else " (matplotlib not installed: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
