"""Triton attention launch configurations on the GPU, at the shapes the headline workloads hit.

- extend: one sequence of Llama-3.1-8B heads (32 query / 8 KV, head 128, bf16, page 16): a
  whole 8k prompt, and the last 8k chunk of a 32k and of a 100k prompt (the earlier chunks
  cached); TFLOP/s over the causal attention FLOPs (``4 * Hq * D`` per visible query-key
  pair) and as a fraction of a large bf16 matmul's rate measured in the same run.
- decode: batches of one query per sequence (Llama 32/8 and Qwen3-MoE 32/4 heads) over their
  paged caches; GB/s of KV bytes read and fraction of the copy bandwidth measured in the run.

Each configuration is checked against the default's output first. Times are medians of
``triton.testing.do_bench_cudagraph`` (a captured graph, as the engine runs decode).
Usage: ``python benchmarks/attention_sweep.py --out attention_sweep.json [--only extend]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import copy_bandwidth  # noqa: E402

from heteroserve.conformance.paged import build_batch  # noqa: E402
from heteroserve.core.kernels.attention import AttentionLayer, ForwardMode  # noqa: E402
from heteroserve.platforms.triton.attention_decode import (  # noqa: E402
    choose_num_splits, decode_attention,
)
from heteroserve.platforms.triton.attention_extend import extend_attention  # noqa: E402

EXTEND_CASES = [("8k", 0, 8192), ("32k_last_chunk", 24576, 8192), ("100k_last_chunk", 94208, 8192)]
EXTEND_CONFIGS = [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2),
                  (128, 128, 8, 4), (128, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3),
                  (128, 32, 4, 3)]
DECODE_CASES = [("llama_b1_ctx128", 1, 128, 8), ("llama_b1_ctx8k", 1, 8192, 8),
                ("llama_b64_ctx1k", 64, 1024, 8), ("llama_b256_ctx1k", 256, 1280, 8),
                ("qwen_b1_ctx128", 1, 128, 4), ("qwen_b256_ctx1k", 256, 1280, 4)]
DECODE_VARIANTS = [(None, 64, 4, 2), (None, 32, 4, 2), (None, 128, 8, 2), (None, 64, 4, 3),
                   (None, 64, 8, 3), (2, 64, 4, 2), (4, 64, 4, 2), (8, 64, 4, 2),
                   (4, 32, 4, 3), (8, 32, 4, 3)]
HQ, D, PAGE = 32, 128, 16
MAX_CONTEXT = 131072


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def matmul_tflops(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def _caches(num_pages: int, hk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages, PAGE, hk, D)
    return (torch.randn(shape, device=device, dtype=torch.bfloat16),
            torch.randn(shape, device=device, dtype=torch.bfloat16))


def checked_time(call, out: torch.Tensor, ref: torch.Tensor | None, bench
                 ) -> tuple[float, float, torch.Tensor]:
    """Run ``call`` once (filling ``out``), compare with ``ref`` (the first variant's output
    when None), then time it with ``bench``: ``(ms, max abs diff, ref)``. Raises what the
    launch raises (a configuration that does not compile)."""
    call()
    torch.cuda.synchronize()
    ref = out.float().clone() if ref is None else ref
    return bench(call), float((out.float() - ref).abs().max()), ref


def sweep_extend(device: torch.device, peak: float) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    layer = AttentionLayer(0, D ** -0.5)
    for name, prefix, new in EXTEND_CASES:
        batch = build_batch(((prefix, new),), PAGE, ForwardMode.EXTEND, device, gen)
        k_cache, v_cache = _caches(batch.num_pages, 8, device)
        q = torch.randn(new, HQ, D, device=device, dtype=torch.bfloat16)
        pairs = sum(prefix + i + 1 for i in range(new))
        flops = 4 * HQ * D * pairs
        ref = None
        for cfg in EXTEND_CONFIGS:
            for heavy in (False, True):
                out = torch.empty_like(q)

                def call() -> None:
                    extend_attention(q, k_cache, v_cache, out, layer, batch.meta, new, 8,
                                     config=cfg, heavy_first=heavy)
                try:
                    ms, err, ref = checked_time(call, out, ref, lambda f: triton.testing.do_bench(
                        f, warmup=5, rep=60))
                except Exception as exc:  # a config that does not compile (shared memory)
                    _log(f"extend {name} {cfg} heavy={heavy}: {type(exc).__name__}")
                    continue
                tf = flops / (ms * 1e-3) / 1e12
                rows.append({"case": name, "config": list(cfg), "heavy_first": heavy,
                             "ms": round(ms, 4), "tflops": round(tf, 1),
                             "fraction_of_matmul": round(tf / peak, 3), "max_abs_diff": err})
                _log(f"extend {name:16s} {cfg} heavy={heavy!s:5s} {ms:8.3f} ms "
                     f"{tf:6.1f} TF/s ({tf / peak:.0%}) diff {err:.2g}")
    return rows


def sweep_decode(device: torch.device, bandwidth: float) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(1)
    layer = AttentionLayer(0, D ** -0.5)
    for name, bsz, ctx, hk in DECODE_CASES:
        batch = build_batch(tuple((ctx - 1, 1) for _ in range(bsz)), PAGE, ForwardMode.DECODE,
                            device, gen)
        k_cache, v_cache = _caches(batch.num_pages, hk, device)
        q = torch.randn(bsz, HQ, D, device=device, dtype=torch.bfloat16)
        kv_bytes = bsz * ctx * hk * D * 2 * 2
        auto = choose_num_splits(bsz, hk, MAX_CONTEXT, device)
        ref = None
        for splits, block_n, warps, stages in DECODE_VARIANTS:
            s = splits or auto
            out = torch.empty_like(q)

            def call() -> None:
                decode_attention(q, k_cache, v_cache, out, layer, batch.meta, hk, s,
                                 block_n=block_n, launch=(warps, stages))
            try:
                ms, err, ref = checked_time(call, out, ref, lambda f: triton.testing.do_bench_cudagraph(
                    f, rep=50))
            except Exception as exc:
                _log(f"decode {name} {(s, block_n, warps, stages)}: {type(exc).__name__}")
                continue
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            rows.append({"case": name, "splits": s, "auto_splits": auto, "block_n": block_n,
                         "num_warps": warps, "num_stages": stages, "us": round(ms * 1e3, 2),
                         "kv_gb_per_s": round(gbs, 1),
                         "fraction_of_copy": round(gbs * 1e9 / bandwidth, 3),
                         "max_abs_diff": err})
            _log(f"decode {name:18s} splits {s:2d}{'*' if s == auto else ' '} bn {block_n:3d} "
                 f"w{warps} s{stages} {ms * 1e3:8.1f} us {gbs:7.0f} GB/s "
                 f"({gbs * 1e9 / bandwidth:.0%}) diff {err:.2g}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="attention_sweep.json")
    ap.add_argument("--only", choices=("extend", "decode"), default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("attention_sweep: needs a GPU")
        return 0
    device = torch.device("cuda")
    peak = matmul_tflops(device)
    bandwidth = copy_bandwidth()
    _log(f"bf16 matmul {peak:.0f} TF/s, copy {bandwidth / 1e9:.0f} GB/s")
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "matmul_tflops": round(peak, 1), "copy_gb_per_s": round(bandwidth / 1e9, 1)}
    if args.only in (None, "decode"):
        result["decode"] = sweep_decode(device, bandwidth)
    if args.only in (None, "extend"):
        result["extend"] = sweep_extend(device, peak)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
