"""End-to-end benchmarks of a Llama-3.1-8B-shaped model with dummy bf16 weights (issue 6).

Runs the engine in-process (model runner + scheduler, no HTTP, no tokenizer: random token
ids), next to the device's measured ceilings and, optionally, HF transformers ``generate`` on
the same model in the same run. Writes one JSON file.

    python benchmarks/bench_llama8b.py --workloads decode1,shared_prefix,hf --out results.json
    python benchmarks/bench_llama8b.py --workloads throughput --num-prompts 1024

Workloads:
  decode1        batch-1 decode tok/s vs the roofline (weight bytes / copy bandwidth)
  throughput     N prompts of I input and O output tokens, ignore_eos; total and output tok/s
                 vs this workload's floor (FLOPs / matmul rate + bytes / copy bandwidth)
  shared_prefix  G groups of R requests sharing a P-token prefix: radix cache on vs off
  hf             HF transformers generate on the same model (batch 1 decode, and a batch)
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
from bench_common import log as _log  # noqa: E402
from bench_common import random_prompts, run_requests  # noqa: E402,F401 (re-exported)
from roofline import copy_bandwidth, matmul_rate  # noqa: E402

MODEL_DIR = Path(os.environ.get("HS_MODEL_DIR", Path(__file__).resolve().parent / "models" / "llama-3.1-8b"))
#: environment settings that change what is measured, recorded in the JSON
ENV_KNOBS = ("HS_KERNELS", "HS_GRAPH_MAX_BS", "HS_CHUNKED_PREFILL", "HETEROSERVE_TRITON_PDL")


def build_engine(disable_radix: bool, max_running: int, chunked: int, mem_fraction: float):
    from bench_common import build_engine as build

    runner, scheduler, _ = build(MODEL_DIR, platform=os.environ.get("HS_PLATFORM", "cuda"),
                                 disable_radix_cache=disable_radix,
                                 max_running_requests=max_running, chunked_prefill_size=chunked,
                                 mem_fraction_static=mem_fraction,
                                 cuda_graph_max_bs=int(os.environ.get("HS_GRAPH_MAX_BS", "256")))
    return runner, scheduler


def weight_bytes(runner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


def bench_decode1(runner, scheduler, ceilings: dict, output_len: int = 256) -> dict:
    run_requests(scheduler, random_prompts(1, 32, runner.vocab_size, 1), 16)  # warm-up
    res = run_requests(scheduler, random_prompts(1, 128, runner.vocab_size, 2), output_len)
    decode_s = res["itl_p50_s"]
    wb = weight_bytes(runner)
    roofline = ceilings["copy_bandwidth_Bps"] / wb
    return {"tok_per_s": 1.0 / decode_s, "roofline_tok_per_s": roofline,
            "fraction_of_roofline": (1.0 / decode_s) / roofline, "weight_bytes": wb, **res}


def workload_floor(cfg: dict, n: int, inp: int, out: int, ceilings: dict, max_running: int) -> dict:
    """FLOPs over the matmul rate plus weight and KV bytes over the copy bandwidth."""
    h, layers, inter, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 128)
    linear_params = layers * (h * (heads + 2 * kv_heads) * hd + heads * hd * h + 3 * h * inter) + h * vocab
    tokens = n * (inp + out)
    linear_flops = 2 * linear_params * tokens
    attn_prefill = n * layers * 2 * 2 * heads * hd * inp * inp / 2  # causal QK^T and PV
    attn_decode = n * layers * 2 * 2 * heads * hd * sum(inp + i for i in range(out))
    flops = linear_flops + attn_prefill + attn_decode
    kv_per_token = layers * 2 * kv_heads * hd * 2
    concurrent = min(n, max_running)
    decode_steps = out * -(-n // concurrent)
    weight_read = decode_steps * (linear_params + h * vocab) * 2
    kv_read = n * kv_per_token * sum(inp + i for i in range(out))
    t_flops = flops / ceilings["matmul_flops"]
    t_bytes = (weight_read + kv_read) / ceilings["copy_bandwidth_Bps"]
    return {"flops": flops, "bytes": weight_read + kv_read, "flop_time_s": t_flops,
            "byte_time_s": t_bytes, "floor_s": t_flops + t_bytes,
            "floor_total_tok_per_s": tokens / (t_flops + t_bytes)}


def bench_throughput(runner, scheduler, ceilings: dict, n: int, inp: int, out: int,
                     max_running: int, model_dir: Path = MODEL_DIR) -> dict:
    run_requests(scheduler, random_prompts(4, 64, runner.vocab_size, 3), 8)  # warm-up
    res = run_requests(scheduler, random_prompts(n, inp, runner.vocab_size, 4), out)
    cfg = json.loads((model_dir / "config.json").read_text())
    floor = workload_floor(cfg, n, inp, out, ceilings, max_running)
    total = (res["input_tokens"] + res["output_tokens"]) / res["elapsed_s"]
    return {"num_prompts": n, "input_len": inp, "output_len": out,
            "total_tok_per_s": total, "output_tok_per_s": res["output_tokens"] / res["elapsed_s"],
            "request_per_s": n / res["elapsed_s"], "floor": floor,
            "fraction_of_floor": floor["floor_s"] / res["elapsed_s"], **res}


def shared_prefix_prompts(groups: int, per_group: int, prefix: int, suffix: int,
                          vocab: int) -> list[list[int]]:
    rng = random.Random(5)
    out = []
    for g in range(groups):
        head = [rng.randrange(10, vocab) for _ in range(prefix)]
        out += [head + [rng.randrange(10, vocab) for _ in range(suffix)] for _ in range(per_group)]
    return out


def bench_hf(ceilings: dict, batch: int, inp: int, out: int) -> dict:
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(MODEL_DIR)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    result = {}
    for name, (b, i, o) in {"batch1_decode": (1, 128, 128), "batch": (batch, inp, out)}.items():
        ids = torch.randint(10, cfg.vocab_size, (b, i), device="cuda")
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, min_new_tokens=4)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=o, min_new_tokens=o, do_sample=False)
        torch.cuda.synchronize()
        el = time.perf_counter() - t0
        result[name] = {"batch": b, "input_len": i, "output_len": o, "elapsed_s": el,
                        "output_tok_per_s": b * o / el, "total_tok_per_s": b * (i + o) / el}
    del model
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="decode1,throughput,shared_prefix,hf")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--chunked-prefill", type=int, default=8192)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=4096)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--mem-fraction", type=float, default=0.80)
    ap.add_argument("--out", default="bench.json")
    a = ap.parse_args()
    wl = a.workloads.split(",")
    result: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(sys.argv), "torch": torch.__version__,
                    "env": {k: os.environ[k] for k in ENV_KNOBS if k in os.environ}}
    _log("measuring ceilings")
    result["ceilings"] = ceilings = {"copy_bandwidth_Bps": copy_bandwidth(),
                                     "matmul_flops": matmul_rate()}
    _log(f"ceilings {ceilings}")
    if any(w in wl for w in ("decode1", "throughput", "shared_prefix")):
        _log("building engine (dummy weights)")
        runner, sched = build_engine(False, a.max_running, a.chunked_prefill, a.mem_fraction)
        if "decode1" in wl:
            _log("decode1")
            result["decode1"] = bench_decode1(runner, sched, ceilings)
            Path(a.out).write_text(json.dumps(result, indent=2, default=str))
            _log(f"decode1 {result['decode1']['tok_per_s']:.1f} tok/s "
                 f"(roofline {result['decode1']['roofline_tok_per_s']:.1f})")
        if "throughput" in wl:
            _log("throughput")
            result["throughput"] = bench_throughput(runner, sched, ceilings, a.num_prompts,
                                                    a.input_len, a.output_len, a.max_running)
            Path(a.out).write_text(json.dumps(result, indent=2, default=str))
            _log(f"throughput {result['throughput']['total_tok_per_s']:.0f} total tok/s")
        if "shared_prefix" in wl:
            prompts = shared_prefix_prompts(a.groups, a.per_group, a.prefix_len, 64,
                                            runner.vocab_size)
            on = run_requests(sched, prompts, 64)
            _log(f"shared prefix, radix on: {on['elapsed_s']:.2f}s")
            del sched, runner
            gc.collect()
            torch.cuda.empty_cache()
            runner, sched = build_engine(True, a.max_running, a.chunked_prefill, a.mem_fraction)
            off = run_requests(sched, prompts, 64)
            _log(f"shared prefix, radix off: {off['elapsed_s']:.2f}s")
            result["shared_prefix"] = {"groups": a.groups, "per_group": a.per_group,
                                       "prefix_len": a.prefix_len, "radix_on": on, "radix_off": off,
                                       "speedup": off["elapsed_s"] / on["elapsed_s"]}
        del sched, runner
        gc.collect()
        torch.cuda.empty_cache()
    if "hf" in wl:
        _log("HF transformers baseline")
        result["hf_transformers"] = bench_hf(ceilings, a.hf_batch, a.input_len, a.output_len)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    _log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
