"""Batch-1 pre-norm and gated projections of Llama-3.1-8B on the GPU: the separate ops
(RMSNorm or SiLU-and-mul, then the Triton GEMV) against the GEMV with the op folded in, over
a grid of launch shapes, each checked against a float64 product first.

Every variant is timed as decode runs it: the calls are captured in a CUDA graph, cycling
over enough weight copies that the set is larger than the L2 cache, and the replay is timed
(median of several), so launch gaps count as they do in a decode graph. Usage:
``python benchmarks/gemv_fused_sweep.py --out gemv_fused.json``
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from gemv_sweep import rotating_weights, sweep_configs  # noqa: E402

from heteroserve.platforms.triton.activation import silu_and_mul
from heteroserve.platforms.triton.gemv import (
    RMS_NORM, SILU_AND_MUL, GemvConfig, choose_config, gemv, gemv_rms_norm, gemv_silu_and_mul,
)
from heteroserve.platforms.triton.norm import fused_add_rms_norm

#: (name, prologue, N, K) at tensor-parallel size 1
SHAPES = [("qkv_proj", "rms_norm", 6144, 4096), ("gate_up_proj", "rms_norm", 28672, 4096),
          ("down_proj", "silu_and_mul", 4096, 14336)]
CONFIGS = [GemvConfig(bn, bk, w, 1) for bn in (2, 4, 8, 16) for bk in (256, 512)
           for w in (4, 8)]
PROLOGUES = {"rms_norm": RMS_NORM, "silu_and_mul": SILU_AND_MUL}
EPS = 1e-5


def graph_us(call: Callable[[torch.Tensor], object], weights: list[torch.Tensor],
             rounds: int = 5) -> float:
    """Microseconds per call when ``call(w)`` for every ``w`` (four rounds) is replayed from one
    graph (``roofline.graph_us``)."""
    calls = [functools.partial(call, w) for _ in range(4) for w in weights]
    return roofline.graph_us(calls, rounds)


def _variants(prologue: str, k: int, dev: torch.device):
    """(inputs, separate(w), fused(w, cfg), float64 reference(w))."""
    g = torch.Generator(device="cpu").manual_seed(k)
    if prologue == "rms_norm":
        x = torch.randn(1, k, generator=g).to(dev, torch.bfloat16)
        r = torch.randn(1, k, generator=g).to(dev, torch.bfloat16)
        nw = (torch.rand(k, generator=g) + 0.5).to(dev, torch.bfloat16)

        xs, rs = x.clone(), r.clone()  # the separate norm works in place

        def separate(w):
            return gemv(fused_add_rms_norm(xs, rs, nw, EPS)[0], w)

        def fused(w, cfg=None):
            return gemv_rms_norm(x, r, nw, EPS, w, None, cfg)[0]

        def reference(w):
            h = (x.float() + r.float()).bfloat16().double()
            a = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * nw.double()
            return a @ w.double().T
        return separate, fused, reference
    x = torch.randn(1, 2 * k, generator=g).to(dev, torch.bfloat16)

    def separate(w):
        return gemv(silu_and_mul(x), w)

    def fused(w, cfg=None):
        return gemv_silu_and_mul(x, w, None, cfg)

    def reference(w):
        return (torch.nn.functional.silu(x[:, :k].double()) * x[:, k:].double()) @ w.double().T
    return separate, fused, reference


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gemv_fused.json")
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows: list[dict] = []
    print(f"device {torch.cuda.get_device_name()}")
    for name, prologue, n, k in SHAPES:
        nbytes = n * k * 2
        weights = rotating_weights(n, k, dev)
        separate, fused, reference = _variants(prologue, k, dev)
        ref = reference(weights[0])
        sep_us = graph_us(separate, weights)
        rows.append({"shape": name, "impl": "separate", "us": sep_us,
                     "TBps": nbytes / sep_us / 1e6})
        default = choose_config(n, k, dev, PROLOGUES[prologue])

        def measure(cfg: GemvConfig) -> tuple[float, float]:
            err = float((fused(weights[0], cfg).double() - ref).abs().max() / ref.abs().max())
            return err, graph_us(lambda w: fused(w, cfg), weights)

        found, d, best = sweep_configs(name, "fused", default, CONFIGS, measure, nbytes, "us")
        rows += found
        print(f"{name:13s} {prologue:12s} separate {sep_us:6.1f} us  fused default "
              f"{d['us']:6.1f} us ({d['config']}, err {d['rel_err']:.1e})  best "
              f"{best['us']:6.1f} us ({best['config']})", flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
