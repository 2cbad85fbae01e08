"""Triton ``fused_moe`` with fp8_block experts (weight-only, 128x128 block scales) against the
same experts in bf16, at the routed-expert shapes of Qwen3-30B-A3B-FP8 and DeepSeek-V3/R1 (one
rank of ``--tp-size 8``: ``I = 2048 / 8``), T = 1..4096 tokens (both sides of the decode /
grouped-GEMM switch at 64 pairs).

``--decode-fold 16`` runs the decode kernels with each 16-byte load's products summed before
their accumulators (``DecodeTile.fold``; the fp8 gate-up kernel's registers: 128 -> fewer,
``benchmarks/kernel_sass.py``-style count), for a side-by-side with the default.

Timing as ``moe_decode_sweep.py``: ``--layers`` calls, each with its own experts and routing,
captured in one CUDA graph, median replay per call. Each row also has the fp8 path's error
against float64 on the dequantized weights (layer 0) and the bf16 path's against float64 on
its own weights. Usage: ``python benchmarks/moe_fp8_bench.py --out moe_fp8.json``;
``--smoke``: a tiny shape through the Triton interpreter on CPU (timing meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_decode_sweep import MoEShape, routing, wall_us  # noqa: E402
from roofline import graph_us  # noqa: E402

from heteroserve.core.kernels.ops import MoEWeightQuant  # noqa: E402
from heteroserve.platforms.triton.moe import fused_moe  # noqa: E402

MODELS = [MoEShape("qwen3-30b-a3b", 2048, 768, 128, 8),
          MoEShape("deepseek-v3-tp8", 7168, 256, 256, 8)]
TOKENS = (1, 4, 8, 64, 512, 4096)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, N, K]`` (N, K multiples of 128) -> ``(e4m3fn values, fp32 scales [E, N/128,
    K/128])`` with one ``amax / 448`` scale per block."""
    e, n, k = w.shape
    blocks = w.float().view(e, n // 128, 128, k // 128, 128)
    scale = (blocks.abs().amax(dim=(2, 4)) / 448.0).clamp(min=1e-12)
    q = (blocks / scale[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(e, n, k), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    full = scale.repeat_interleave(128, 1).repeat_interleave(128, 2)
    return q.double() * full.double()


def reference(x, w13, w2, tw, ids) -> torch.Tensor:
    """float64 on the device, expert by expert."""
    x, out = x.double(), torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    inter = w13.shape[1] // 2
    for e in ids.unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        h = x[rows] @ w13[e].double().T
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].double().T
        out.index_add_(0, rows, y * tw[rows, slots, None].double())
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max())


def run(models: list[MoEShape], tokens: tuple[int, ...], layers: int,
        device: torch.device) -> dict:
    began = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = graph_us if device.type == "cuda" else wall_us
    rows = []
    for shape in models:
        g = torch.Generator(device=device).manual_seed(0)
        h, i, e = shape.hidden, shape.inter, shape.experts
        dense13 = [(torch.randn(e, 2 * i, h, generator=g, device=device) * h ** -0.5)
                   .to(dtype) for _ in range(layers)]
        dense2 = [(torch.randn(e, h, i, generator=g, device=device) * i ** -0.5).to(dtype)
                  for _ in range(layers)]
        q13 = [quantize_blocks(w) for w in dense13]
        q2 = [quantize_blocks(w) for w in dense2]
        if device.type != "cuda":  # the interpreter has no fp8: fp32 stand-ins
            q13 = [(q.float(), s) for q, s in q13]
            q2 = [(q.float(), s) for q, s in q2]
        for t in tokens:
            gen = torch.Generator().manual_seed(t)
            tw, ids = routing(layers, t, shape, gen)
            tw, ids = tw.to(device), ids.to(device)
            xs = [torch.randn(t, h, generator=gen).to(device, dtype) for _ in range(layers)]
            quants = [MoEWeightQuant("fp8_block", s13, s2) for (_, s13), (_, s2) in zip(q13, q2)]
            paths = {
                "bf16": lambda n: fused_moe(xs[n], dense13[n], dense2[n], tw[n], ids[n]),
                "fp8_block": lambda n: fused_moe(xs[n], q13[n][0], q2[n][0], tw[n], ids[n],
                                                 quant=quants[n]),
            }
            refs = {"bf16": reference(xs[0], dense13[0], dense2[0], tw[0], ids[0]),
                    "fp8_block": reference(xs[0], dequantize(*q13[0]), dequantize(*q2[0]),
                                           tw[0], ids[0])}
            for name, call in paths.items():
                err = rel_err(call(0), refs[name])
                us = timer([lambda n=n, c=call: c(n) for n in range(layers)])
                rows.append({"model": shape.name, "tokens": t, "pairs": t * shape.top_k,
                             "weights": name, "us": us, "rel_err": err})
        del dense13, dense2, q13, q2
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "layers_per_graph": layers, "seconds": time.perf_counter() - began, "rows": rows}


def table(report: dict) -> str:
    by = {(r["model"], r["tokens"], r["weights"]): r for r in report["rows"]}
    lines = ["model              tokens  bf16 us  fp8 us  speedup  fp8 rel_err"]
    for (model, t, w), r in by.items():
        if w != "fp8_block":
            continue
        b = by[(model, t, "bf16")]
        lines.append(f"{model:<18} {t:>6} {b['us']:>8.1f} {r['us']:>7.1f} "
                     f"{b['us'] / r['us']:>7.2f}x {r['rel_err']:>11.2e}")
    return "\n".join(lines)


def fold_decode_tiles(fold: int) -> None:
    """Every decode launch of this process with ``fold`` on both kernels' tiles."""
    from dataclasses import replace

    from heteroserve.platforms.triton import moe_decode

    default = moe_decode.choose_config

    def folded(*args, **kwargs):
        cfg = default(*args, **kwargs)
        return replace(cfg, gate_up=replace(cfg.gate_up, fold=fold),
                       down=replace(cfg.down, fold=fold))
    moe_decode.choose_config = folded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_fp8.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU (interpreter)")
    ap.add_argument("--decode-fold", type=int, default=1,
                    help="the decode kernels' DecodeTile.fold (1: the default accumulators)")
    args = ap.parse_args()
    if args.decode_fold != 1:
        fold_decode_tiles(args.decode_fold)
    if args.smoke:
        report = run([MoEShape("smoke", 256, 128, 4, 2)], (2, 40), 1, torch.device("cpu"))
    else:
        report = run(MODELS, TOKENS, args.layers, torch.device("cuda"))
    report["decode_fold"] = args.decode_fold
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(table(report))
    bad = [r for r in report["rows"] if not r["rel_err"] < 2e-2]
    if bad:
        print(f"error above 2e-2: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
