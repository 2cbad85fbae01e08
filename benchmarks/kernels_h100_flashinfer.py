"""flashinfer adapters against the Triton kernels on the same inputs (used by kernels_h100.py
when flashinfer is importable). Its JIT builds dominate: decode ~16 s, sm90 prefill ~90 s."""

from __future__ import annotations

import time
from typing import Any

import torch
from kernels_h100_checks import DEV, TOL, attention_case, rel, row
from kernels_h100_perf import attention_setup, gbps, ms_of, tflops

from heteroserve.core.kernels.attention import ForwardMode

Row = dict[str, Any]
BF = torch.bfloat16


def _timed(label: str, fn: Any) -> tuple[Any, Row]:
    t0 = time.time()
    out = fn()
    return out, {"name": f"first call incl. JIT: {label}", "seconds": round(time.time() - t0, 1)}


def fi_decode() -> list[Row]:
    import flashinfer

    from heteroserve.platforms.cuda.flashinfer_attention import FlashInferAttention
    from heteroserve.platforms.triton.attention import TritonAttention

    gen = torch.Generator().manual_seed(5)
    seqs = tuple((int(x), 1) for x in torch.randint(0, 4000, (16,), generator=gen))
    (rows, _, _), jit = _timed("flashinfer decode", lambda: attention_case(
        FlashInferAttention, BF, ForwardMode.DECODE, seqs, 32, 8, 128, 16, seed=0))
    rows = [{"name": f"flashinfer version {flashinfer.__version__}", "ok": True}, jit, *rows]
    for b, ctx in ((1, 32768), (32, 1024), (32, 8192), (128, 2048), (256, 4096)):
        kv = 2 * b * ctx * 8 * 128 * 2
        for cls in (FlashInferAttention, TritonAttention):
            fn, _ = attention_setup(cls, ForwardMode.DECODE, ((ctx - 1, 1),) * b)
            fn()
            ms = ms_of(fn)
            rows.append({"name": f"{cls.__name__} decode B{b} ctx{ctx} Hq32/Hk8 D128 bf16",
                         "ms": ms, "metric": gbps(kv, ms)})
    return rows


def fi_extend() -> list[Row]:
    from heteroserve.platforms.cuda.flashinfer_attention import FlashInferAttention
    from heteroserve.platforms.triton.attention import TritonAttention

    (rows, _, _), jit = _timed("flashinfer prefill", lambda: attention_case(
        FlashInferAttention, BF, ForwardMode.EXTEND, ((0, 1024), (700, 300), (37, 1), (0, 5)),
        32, 8, 128, 16, seed=1))
    rows = [jit, *rows]
    for seqs, label in ((((0, 4096),), "1x4096 prefill"), (((0, 1024),) * 8, "8x1024 prefill"),
                        (((3072, 1024),), "chunk 1024 on 3072 prefix")):
        pairs = sum(n * p + n * (n + 1) / 2 for p, n in seqs)
        for cls in (FlashInferAttention, TritonAttention):
            fn, _ = attention_setup(cls, ForwardMode.EXTEND, seqs)
            fn()
            ms = ms_of(fn)
            rows.append({"name": f"{cls.__name__} extend {label} Hq32/Hk8 D128 bf16", "ms": ms,
                         "metric": tflops(4 * pairs * 32 * 128, ms)})
    return rows


def fi_norm() -> list[Row]:
    from gemv_fused_sweep import graph_us

    from heteroserve.platforms.cuda import flashinfer_norm as fin
    from heteroserve.platforms.triton import norm

    x = torch.randn(4096, 4096, device=DEV, dtype=BF)
    r = torch.randn(4096, 4096, device=DEV, dtype=BF)
    w = torch.randn(4096, device=DEV, dtype=BF)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    out, jit = _timed("flashinfer norm", lambda: fin.rms_norm(x, w, 1e-6))
    rows = [jit, row("flashinfer rms_norm bf16 4096x4096", rel(out, ref), TOL[BF])]
    s = (x.float() + r.float()).to(BF).double()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    o, res = fin.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-6)
    rows.append(row("flashinfer fused_add_rms_norm bf16 4096x4096",
                    max(rel(o, ref), rel(res, s)), TOL[BF]))

    def pairs(xt: torch.Tensor, rt: torch.Tensor) -> tuple[tuple[str, Any], ...]:
        return (("flashinfer rms_norm", lambda: fin.rms_norm(xt, w, 1e-6)),
                ("triton rms_norm", lambda: norm.rms_norm(xt, w, 1e-6)),
                ("flashinfer fused_add_rms_norm",
                 lambda: fin.fused_add_rms_norm(xt, rt, w, 1e-6)),
                ("triton fused_add_rms_norm", lambda: norm.fused_add_rms_norm(xt, rt, w, 1e-6)))

    for name, fn in pairs(x, r):  # bandwidth-bound: one prefill-sized call
        ms = ms_of(fn)
        nbytes = (4 if "fused" in name else 2) * 4096 * 4096 * 2
        rows.append({"name": f"{name} T4096 H4096 bf16", "ms": ms, "metric": gbps(nbytes, ms)})
    xt1 = x[:1].clone()
    for name, fn in pairs(xt1, r[:1].clone()):  # latency-bound: a decode row, 200 calls
        rows.append({"name": f"{name} T1 H4096 bf16, per call in a CUDA graph",
                     "ms": graph_us(lambda _: fn(), [xt1] * 50) / 1e3})
    return rows


FLASHINFER = [("fi_decode", fi_decode), ("fi_extend", fi_extend), ("fi_norm", fi_norm)]
#: seconds each item needs (its JIT build included); it is skipped when fewer remain
NEED_SECONDS = {"fi_decode": 45.0, "fi_extend": 115.0, "fi_norm": 45.0}


def main() -> int:
    """Run the named items (default all) and write their rows as JSON."""
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description="flashinfer adapters against the Triton kernels")
    ap.add_argument("--only", action="append", choices=[n for n, _ in FLASHINFER])
    ap.add_argument("--out", default="flashinfer_kernels.json")
    a = ap.parse_args()
    rows = [r for n, fn in FLASHINFER if not a.only or n in a.only for r in fn()]
    for r in rows:
        print(r, flush=True)
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
