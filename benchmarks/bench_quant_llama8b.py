"""Quantized Llama-3.1-8B-shaped engines with dummy weights (issue 16), next to bf16 in the
same run: batch-1 decode against each format's own roofline (its weight bytes / the copy
bandwidth measured here) and offline throughput on N prompts of I input and O output tokens.

Each format is a model folder written under ``$OUT/models``: the Llama-3.1-8B config plus the
``quantization_config`` a real checkpoint of that format carries; the engine loads it with
``--load-format dummy``, so the linear layers hold that format's tensors (random values).

    OUT=/tmp/out python benchmarks/bench_quant_llama8b.py              # everything, ~7 min on an H200
    python benchmarks/bench_quant_llama8b.py --formats bf16,fp8_block --num-prompts 1024
    python benchmarks/bench_quant_llama8b.py --formats bf16,bf16:kvfp8   # fp8 KV cache vs bf16
    python benchmarks/bench_quant_llama8b.py --model-dir benchmarks/models/qwen3-30b-a3b \
        --formats ct_w4a16,bf16 --num-prompts 0   # 4-bit MoE experts (roofline: all weights)
    python benchmarks/bench_quant_llama8b.py --platform cpu --model-dir TINY --num-prompts 4 \
        --input-len 16 --output-len 8       # smoke run on a CPU

A ``:kvfp8`` suffix runs that format with ``--kv-cache-dtype fp8_e4m3`` (on cuda the
Triton attention kernels store and read the fp8 cache).

Writes ``quant_llama8b.json`` and ``quant_llama8b.png`` under ``--out-dir`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import active_weight_bytes  # noqa: E402
from bench_llama8b import random_prompts, run_requests  # noqa: E402

LLAMA_DIR = Path(__file__).resolve().parent / "models" / "llama-3.1-8b"

#: format -> quantization_config (None: the bf16 baseline); the projections' scheme in a comment
FORMATS: dict[str, dict | None] = {
    "bf16": None,
    # Qwen3-FP8 / DeepSeek-V3 layout -> fp8_block
    "fp8_block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                  "weight_block_size": [128, 128]},
    # compressed-tensors FP8 (per-tensor weights, dynamic per-token activations) -> fp8_per_tensor
    "ct_fp8_tensor": {"quant_method": "compressed-tensors", "format": "float-quantized",
                      "quantization_status": "compressed", "ignore": ["lm_head"],
                      "config_groups": {"group_0": {
                          "targets": ["Linear"], "format": "float-quantized",
                          "weights": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                      "symmetric": True, "dynamic": False},
                          "input_activations": {"num_bits": 8, "type": "float",
                                                "strategy": "token", "symmetric": True,
                                                "dynamic": True}}}},
    # compressed-tensors FP8_DYNAMIC (per-channel weights) -> fp8_per_channel
    "ct_fp8_channel": {"quant_method": "compressed-tensors", "format": "float-quantized",
                       "quantization_status": "compressed", "ignore": ["lm_head"],
                       "config_groups": {"group_0": {
                           "targets": ["Linear"], "format": "float-quantized",
                           "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                       "symmetric": True, "dynamic": False},
                           "input_activations": {"num_bits": 8, "type": "float",
                                                 "strategy": "token", "symmetric": True,
                                                 "dynamic": True}}}},
    # compressed-tensors W8A8 int8 -> int8_w8a8
    "ct_w8a8_int8": {"quant_method": "compressed-tensors", "format": "int-quantized",
                     "quantization_status": "compressed", "ignore": ["lm_head"],
                     "config_groups": {"group_0": {
                         "targets": ["Linear"], "format": "int-quantized",
                         "weights": {"num_bits": 8, "type": "int", "strategy": "channel",
                                     "symmetric": True, "dynamic": False},
                         "input_activations": {"num_bits": 8, "type": "int", "strategy": "token",
                                               "symmetric": True, "dynamic": True}}}},
    # compressed-tensors W4A16 (pack-quantized, group 128, symmetric) -> gptq_w4a16
    "ct_w4a16": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                 "quantization_status": "compressed", "ignore": ["lm_head"],
                 "config_groups": {"group_0": {
                     "targets": ["Linear"], "format": "pack-quantized",
                     "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                 "group_size": 128, "symmetric": True, "dynamic": False},
                     "input_activations": None}}},
    # AutoAWQ GEMM, group 128 -> awq_w4a16
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
            "version": "gemm"},
}
DEFAULT_FORMATS = "bf16,fp8_block,ct_fp8_tensor,ct_w8a8_int8,ct_w4a16"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_model(src: Path, root: Path, fmt: str) -> Path:
    """``src``'s config with format ``fmt``'s quantization_config, in ``root/fmt``."""
    out = root / fmt
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if FORMATS[fmt] is not None:
        cfg["quantization_config"] = FORMATS[fmt]
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def build(path: Path, a: argparse.Namespace, kv_cache_dtype: str):
    from heteroserve.core.config import ServerArgs
    from heteroserve.core.layers.moe import expert_storages
    from heteroserve.core.model_runner.build import build_model_runner, quantization_lines
    from heteroserve.core.scheduler import Scheduler

    args = ServerArgs(model_path=str(path), load_format="dummy", dtype="bfloat16",
                      platform=a.platform, max_running_requests=a.max_running,
                      chunked_prefill_size=a.chunked_prefill, mem_fraction_static=a.mem_fraction,
                      max_total_tokens=a.max_total_tokens, kv_cache_dtype=kv_cache_dtype,
                      cuda_graph_max_bs=int(os.environ.get("HS_GRAPH_MAX_BS", "256")),
                      kernel=[k for k in os.environ.get("HS_KERNELS", "").split(",") if k])
    _, dispatch, runner = build_model_runner(args)
    kernels = {op: f"{impl} ({kind})" for op, impl, kind in dispatch.summary()
               if op.startswith("linear.")}
    quant = "\n".join(quantization_lines(runner.quant, dispatch.resolutions,
                                          expert_storages(runner.model), runner.model_config.dtype))
    return runner, Scheduler(runner, args, [], runner.page_size), kernels, quant


def weight_bytes(runner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


def synchronize(runner) -> None:
    runner.platform.synchronize(runner.device)


def measure(fmt: str, path: Path, a: argparse.Namespace, bandwidth: float | None) -> dict:
    kv = "fp8_e4m3" if fmt.endswith(":kvfp8") else "auto"
    runner, sched, kernels, quant = build(path, a, kv)
    _log(f"{fmt}: engine built\n{quant}")
    vocab = runner.vocab_size
    res: dict = {"linear_kernels": kernels, "quantization": quant, "kv_cache_dtype": kv,
                 "attention": runner.dispatch.resolutions["attention"].chosen.name,
                 "weight_bytes": weight_bytes(runner), "kv_tokens": runner.max_total_tokens,
                 "active_weight_bytes": active_weight_bytes(runner)}
    run_requests_sync = lambda prompts, n: (run_requests(sched, prompts, n)  # noqa: E731
                                            if a.platform != "cpu" else _cpu_run(sched, prompts, n))
    run_requests_sync(random_prompts(1, 32, vocab, 1), 16)  # warm-up (graphs, autotune)
    d1 = run_requests_sync(random_prompts(1, 128, vocab, 2), a.decode_len)
    tok_s = 1.0 / d1["itl_p50_s"]
    roof = bandwidth / res["weight_bytes"] if bandwidth else None
    # the format's roofline reads every weight; the active one what a token reads (for a MoE
    # only its top-k experts, for any model one embedding row)
    active = bandwidth / res["active_weight_bytes"] if bandwidth else None
    res["decode1"] = {"tok_per_s": tok_s, "roofline_tok_per_s": roof,
                      "fraction_of_roofline": tok_s / roof if roof else None,
                      "active_roofline_tok_per_s": active,
                      "fraction_of_active_roofline": tok_s / active if active else None,
                      "itl_p50_s": d1["itl_p50_s"], "itl_p99_s": d1["itl_p99_s"]}
    _log(f"{fmt}: decode1 {tok_s:.1f} tok/s" + (f" ({tok_s / roof:.0%} of {roof:.0f})" if roof else ""))
    if a.num_prompts:
        run_requests_sync(random_prompts(8, 64, vocab, 3), 8)
        tp = run_requests_sync(random_prompts(a.num_prompts, a.input_len, vocab, 4), a.output_len)
        res["throughput"] = {
            "num_prompts": a.num_prompts, "input_len": a.input_len, "output_len": a.output_len,
            "elapsed_s": tp["elapsed_s"],
            "total_tok_per_s": (tp["input_tokens"] + tp["output_tokens"]) / tp["elapsed_s"],
            "output_tok_per_s": tp["output_tokens"] / tp["elapsed_s"],
            "ttft_p50_s": tp["ttft_p50_s"], "itl_p50_s": tp["itl_p50_s"]}
        _log(f"{fmt}: throughput {res['throughput']['total_tok_per_s']:.0f} total tok/s")
    del sched, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def _cpu_run(sched, prompts, n) -> dict:
    """run_requests without its CUDA synchronize (CPU smoke runs)."""
    sync, torch.cuda.synchronize = torch.cuda.synchronize, lambda *x: None
    try:
        return run_requests(sched, prompts, n)
    finally:
        torch.cuda.synchronize = sync


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        _log("matplotlib is not installed: no PNG")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmts = list(result["formats"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    d1 = [result["formats"][f]["decode1"]["tok_per_s"] for f in fmts]
    roof = [result["formats"][f]["decode1"]["roofline_tok_per_s"] or 0 for f in fmts]
    x = range(len(fmts))
    ax1.bar([i - 0.2 for i in x], d1, 0.4, label="measured")
    ax1.bar([i + 0.2 for i in x], roof, 0.4, label="roofline (weight bytes / copy BW)")
    ax1.set_xticks(list(x), fmts, rotation=20)
    ax1.set_ylabel("tok/s")
    ax1.set_title("batch-1 decode")
    ax1.legend()
    if all("throughput" in result["formats"][f] for f in fmts):
        tp = [result["formats"][f]["throughput"]["total_tok_per_s"] for f in fmts]
        ax2.bar(list(x), tp)
        base = result["formats"].get("bf16", {}).get("throughput", {}).get("total_tok_per_s")
        for i, v in enumerate(tp):
            ax2.text(i, v, f"{v / base:.2f}x" if base else f"{v:.0f}", ha="center", va="bottom")
        ax2.set_xticks(list(x), fmts, rotation=20)
        t = result["formats"][fmts[0]]["throughput"]
        ax2.set_title(f"offline throughput, {t['num_prompts']} x ({t['input_len']} in / "
                      f"{t['output_len']} out), vs bf16")
        ax2.set_ylabel("total tok/s")
    fig.suptitle(f"{result['device']}  {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None, tags: dict[str, str] | None = None) -> int:
    """Run the formats ``argv`` names (``sys.argv`` when None); ``tags`` go into the JSON
    as they are (``w8_rule.py`` and ``w4_rule.py`` name their launch rule there)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=DEFAULT_FORMATS, help=f"of {', '.join(FORMATS)}")
    ap.add_argument("--model-dir", default=str(LLAMA_DIR))
    ap.add_argument("--platform", default=os.environ.get("HS_PLATFORM", "cuda"))
    ap.add_argument("--num-prompts", type=int, default=256,
                    help="throughput prompts (the issue's workload is 1024; 0 skips)")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--decode-len", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--chunked-prefill", type=int, default=8192)
    ap.add_argument("--mem-fraction", type=float, default=0.80)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmts = [f.strip() for f in a.formats.split(",")]
    unknown = [f for f in fmts if f.removesuffix(":kvfp8") not in FORMATS]
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    on_gpu = a.platform != "cpu" and torch.cuda.is_available()
    result: dict = {"device": torch.cuda.get_device_name() if on_gpu else "cpu",
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(sys.argv), "torch": torch.__version__, **(tags or {}),
                    "formats": {}}
    if on_gpu:
        from roofline import copy_bandwidth

        result["copy_bandwidth_Bps"] = copy_bandwidth()
        _log(f"copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s")
    for fmt in fmts:
        path = write_model(Path(a.model_dir), out / "models", fmt.removesuffix(":kvfp8"))
        try:
            result["formats"][fmt] = measure(fmt, path, a, result.get("copy_bandwidth_Bps"))
        except Exception as exc:  # one format failing must not lose the others' numbers
            _log(f"{fmt}: FAILED {type(exc).__name__}: {exc}")
            result.setdefault("failed", {})[fmt] = f"{type(exc).__name__}: {exc}"
        (out / "quant_llama8b.json").write_text(json.dumps(result, indent=2, default=str))
    base = result["formats"].get("bf16", {}).get("throughput", {}).get("total_tok_per_s")
    for fmt, r in result["formats"].items():
        if base and "throughput" in r:
            r["throughput"]["vs_bf16"] = r["throughput"]["total_tok_per_s"] / base
    (out / "quant_llama8b.json").write_text(json.dumps(result, indent=2, default=str))
    if result["formats"]:
        plot(result, out / "quant_llama8b.png")
    _log(f"wrote {out / 'quant_llama8b.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
