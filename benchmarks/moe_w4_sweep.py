"""4-bit (``w4a16``) fused MoE at decode sizes on the GPU: ``decode_moe_w4`` at the expert
shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite, T = 1 and 8 tokens, under its default launch
shapes and their neighbours, next to the bf16 ``decode_moe`` on the same shape.

Timed as a decode graph runs it (``moe_decode_sweep``'s method): ``LAYERS`` calls, each with
its own experts (nothing stays in the L2) and its own uniform routing, replayed from one CUDA
graph. Bandwidth counts the distinct routed experts' bytes a call reads (words, fp32 scales
and int8 zeros for w4a16; bf16 weights for the baseline) against the copy bandwidth measured
in the same run. Every shape is checked against a float64 product of the dequantized experts
first. Usage: ``python benchmarks/moe_w4_sweep.py --out moe_w4.json``; ``--smoke`` runs a
tiny shape on CPU through the Triton interpreter (timing meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_decode_sweep import (  # noqa: E402
    MODELS, SMOKE_MODEL, MoEShape, Workload, copy_bandwidth, reference, rel_err, routed_bytes,
    routing, wall_us,
)
from roofline import graph_us  # noqa: E402

from heteroserve.core.kernels.ops import MoEWeightQuant, dequantize_w4_experts  # noqa: E402
from heteroserve.platforms.triton.moe_decode import decode_moe  # noqa: E402
from heteroserve.platforms.triton.moe_w4 import (  # noqa: E402
    W4DecodeConfig, choose_w4_config, decode_moe_w4,
)

GROUP = 128
LAYERS = 16


def neighbours(default: W4DecodeConfig) -> list[W4DecodeConfig]:
    """``default`` and, one kernel and one knob at a time: half and double the outputs and
    the words per step, twice the warps."""
    out = [default]
    for name in ("gate_up", "down"):
        tile = getattr(default, name)
        for t in (replace(tile, block_n=max(1, tile.block_n // 2)),
                  replace(tile, block_n=tile.block_n * 2),
                  replace(tile, block_kw=max(1, tile.block_kw // 2)),
                  replace(tile, block_kw=tile.block_kw * 2),
                  replace(tile, num_warps=tile.num_warps * 2)):
            out.append(replace(default, **{name: t}))
    return list(dict.fromkeys(out))


class W4Workload:
    """``layers`` random w4a16 expert sets of ``shape`` (words, fp32 scales, int8 zeros)."""

    def __init__(self, shape: MoEShape, layers: int, device: torch.device, group: int) -> None:
        self.shape, self.group = shape, group
        g = torch.Generator(device=device).manual_seed(0)
        h, i, e = shape.hidden, shape.inter, shape.experts

        def experts(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            words = torch.randint(-2**31, 2**31 - 1, (e, n, k // 8), generator=g,
                                  device=device, dtype=torch.int32)
            scale = torch.rand(e, n, k // group, generator=g, device=device) * 0.02 / k ** 0.5
            zero = torch.randint(0, 16, (e, n, k // group), generator=g, device=device,
                                 dtype=torch.int8)
            return words, scale, zero

        self.sets = []
        for _ in range(layers):
            w13, s13, z13 = experts(2 * i, h)
            w2, s2, z2 = experts(h, i)
            self.sets.append((w13, w2, MoEWeightQuant("w4a16", s13, s2, z13, z2, group)))
        self.timer = graph_us if device.type == "cuda" else wall_us

    def expert_bytes(self) -> int:
        w13, w2, q = self.sets[0]
        per = [w13, w2, q.w13_scale, q.w2_scale, q.w13_zero, q.w2_zero]
        return sum(t.numel() * t.element_size() for t in per) // self.shape.experts

    def measure(self, cfg: W4DecodeConfig, xs: list[torch.Tensor], tw: torch.Tensor,
                ids: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        w13, w2, q = self.sets[0]
        err = rel_err(decode_moe_w4(xs[0], w13, w2, tw[0], ids[0], q, cfg), ref)
        calls = [lambda n=n: decode_moe_w4(xs[n], *self.sets[n][:2], tw[n], ids[n],
                                           self.sets[n][2], cfg) for n in range(len(xs))]
        return err, self.timer(calls)


def run(models: list[MoEShape], tokens: tuple[int, ...], layers: int, device: torch.device,
        copy_bytes: int, group: int) -> dict:
    """Every model x token count: the bf16 ``decode_moe`` baseline, then ``decode_moe_w4``
    under :func:`neighbours` of its default shapes. Returns the report."""
    began = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy = copy_bandwidth(device, copy_bytes)
    rows: list[dict] = []
    for shape in models:
        work = W4Workload(shape, layers, device, group)
        dense = Workload(shape, layers, device, dtype)
        for t in tokens:
            g = torch.Generator().manual_seed(t)
            tw, ids = routing(layers, t, shape, g)
            tw, ids = tw.to(device), ids.to(device)
            xs = [torch.randn(t, shape.hidden, generator=g).to(device, dtype)
                  for _ in range(layers)]
            base = {"model": shape.name, "tokens": t, "pairs": t * shape.top_k}
            d_err, d_us = dense.measure(decode_moe, xs, tw, ids,
                                        reference(xs[0], dense.w13[0], dense.w2[0], tw[0],
                                                  ids[0]))
            d_bytes = routed_bytes(ids.cpu(), shape.expert_bytes(torch.finfo(dtype).bits // 8))
            rows.append({**base, "path": "bf16 decode_moe", "us": d_us, "rel_err": d_err,
                         "fraction_of_copy": d_bytes / (d_us * 1e-6) / copy})
            w13, w2, q = work.sets[0]
            ref = reference(xs[0], dequantize_w4_experts(w13, q.w13_scale, q.w13_zero, group),
                            dequantize_w4_experts(w2, q.w2_scale, q.w2_zero, group), tw[0],
                            ids[0])
            nbytes = routed_bytes(ids.cpu(), work.expert_bytes())
            default = choose_w4_config(t, shape.top_k, shape.hidden, shape.inter, group, device)
            for cfg in neighbours(default):
                row = {**base, "path": "w4a16 decode_moe_w4", "config": asdict(cfg),
                       "default": cfg == default}
                try:
                    err, us = work.measure(cfg, xs, tw, ids, ref)
                except Exception as e:  # a shape the compiler rejects is a row, not a crash
                    rows.append({**row, "error": str(e)[:200]})
                    continue
                rows.append({**row, "us": us, "rel_err": err,
                             "fraction_of_copy": nbytes / (us * 1e-6) / copy})
                print(f"{shape.name} T={t} {cfg}: {us:.1f} us "
                      f"({rows[-1]['fraction_of_copy']:.0%} of copy), err {err:.1e}", flush=True)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "group": group, "layers_per_graph": layers, "copy_bandwidth_Bps": copy,
            "seconds": time.perf_counter() - began, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_w4_sweep.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU interpreter")
    a = ap.parse_args()
    if a.smoke:
        report = run([SMOKE_MODEL], (1,), 2, torch.device("cpu"), 1 << 16, 8)
    else:
        report = run(MODELS[:2], (1, 8), LAYERS, torch.device("cuda"), 1 << 30, GROUP)
    Path(a.out).write_text(json.dumps(report, indent=1))
    best = {}
    for r in report["rows"]:
        if "us" in r and r["path"].startswith("w4a16"):
            key = (r["model"], r["tokens"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for (model, t), r in best.items():
        print(f"best w4a16 {model} T={t}: {r['us']:.1f} us ({r['fraction_of_copy']:.0%}) "
              f"{r['config']}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
