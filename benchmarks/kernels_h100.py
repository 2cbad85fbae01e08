"""Correctness and speed of the cuda platform's kernels on one GPU, in one run.

    python benchmarks/kernels_h100.py --out DIR [--budget SECONDS] [--skip-flashinfer]

Sections, in order (each guarded: a failure is recorded and the run goes on; the JSON is
rewritten after every section, so a run cut short keeps what it measured):

1. ``env``: device, versions, and the two ceilings (device-to-device copy GB/s, bf16 GEMM
   TFLOP/s) that the numbers below are read against.
2. ``correctness``: every Triton kernel in bf16/fp16 (and fp32 where it matters) on real
   model sizes against float64 (or fp32-upcast) references: ``max|out-ref| / max|ref|``
   (the conformance measure), exact checks for KV writes, bitmask, greedy and top-k ids,
   CUDA-graph replay equal to eager.
3. ``perf``: medians of ``triton.testing.do_bench`` (L2 flushed between repetitions) for
   attention (decode split-KV, extend), fused MoE, the linear methods, norms, activations,
   rotary and sampling, with torch / cuBLAS / torch-native baselines where one exists.
4. ``flashinfer`` (when it is importable and time remains): FlashInferAttention and the
   flashinfer norms against the Triton kernels on the same inputs, correctness and timings.
5. ``tune``: tile-config sweeps (each candidate checked against the default's output).

Writes ``DIR/kernels_h100.json``; prints a short table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_h100_checks import CHECKS  # noqa: E402
from kernels_h100_perf import PERF  # noqa: E402
from kernels_h100_tune import TUNE  # noqa: E402

#: seconds kept for the perf section after the correctness checks
PERF_RESERVE = 120.0
RESULTS: dict[str, Any] = {"env": {}, "correctness": [], "perf": [], "flashinfer": [],
                           "tune": [], "errors": [], "section_seconds": {}}


def _write(out: Path) -> None:
    (out / "kernels_h100.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def _env() -> None:
    import triton
    from triton.testing import do_bench

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    env = RESULTS["env"]
    env.update(device=torch.cuda.get_device_name(dev), sms=props.multi_processor_count,
               capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               argv=sys.argv)
    n = 1 << 28  # 256 Mi bf16 = 512 MiB
    src = torch.randn(n, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    env["copy_GBps"] = round(2 * n * 2 / ms / 1e6, 1)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    env["bf16_gemm_TFLOPs"] = round(2 * 8192 ** 3 / ms / 1e9, 1)


def _run_list(kind: str, items: list[tuple[str, Callable[[], list[dict[str, Any]]]]],
              deadline: float, out: Path, need: dict[str, float] | None = None) -> None:
    """Run each item while at least ``need[name]`` seconds (default 0) remain."""
    for name, fn in items:
        if time.time() + (need or {}).get(name, 0.0) > deadline:
            RESULTS["errors"].append({"section": kind, "name": name, "error": "skipped: budget"})
            continue
        t0 = time.time()
        try:
            RESULTS[kind].extend(fn())
        except Exception as exc:  # record and go on: one broken kernel must not end the run
            RESULTS["errors"].append({"section": kind, "name": name,
                                      "error": f"{type(exc).__name__}: {exc}",
                                      "trace": traceback.format_exc()[-2000:]})
        torch.cuda.synchronize()
        RESULTS["section_seconds"][f"{kind}:{name}"] = round(time.time() - t0, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {kind}:{name} {time.time() - t0:.1f}s", flush=True)
        _write(out)


def _table() -> None:
    print(f"\n{'check':58s} {'err':>10s} {'tol':>8s} ok")
    for r in RESULTS["correctness"] + RESULTS["flashinfer"]:
        if "err" in r:
            print(f"{r['name'][:58]:58s} {r['err']:10.2e} {r['tol']:8.0e} "
                  f"{'PASS' if r['ok'] else 'FAIL'}")
    print(f"\n{'benchmark':70s} {'ms':>9s}  metric")
    for r in RESULTS["perf"] + RESULTS["flashinfer"] + RESULTS["tune"]:
        if "ms" in r:
            extra = f" (err {r['err_vs_default']:.1e})" if "err_vs_default" in r else ""
            print(f"{r['name'][:70]:70s} {r['ms']:9.4f}  {r.get('metric', '')}{extra}")
        elif "error" in r:
            print(f"{r['name'][:70]:70s}   failed: {r['error'][:80]}")
        elif "seconds" in r:
            print(f"{r['name'][:58]:58s} {r['seconds']:9.1f}s")
    for e in RESULTS["errors"]:
        print(f"ERROR {e['section']}:{e['name']}: {e['error']}")
    print(json.dumps(RESULTS["env"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=380.0, help="seconds for the whole run")
    parser.add_argument("--skip-flashinfer", action="store_true")
    parser.add_argument("--skip-tune", action="store_true")
    parser.add_argument("--only", default="", help="comma list of check/perf names to run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    only = {s for s in args.only.split(",") if s}

    def pick(items: list[tuple[str, Callable]]) -> list[tuple[str, Callable]]:
        return [(n, f) for n, f in items if not only or n in only]

    try:
        _env()
    except Exception as exc:
        RESULTS["errors"].append({"section": "env", "name": "env", "error": repr(exc)})
    _write(args.out)
    _run_list("correctness", pick(CHECKS), deadline - PERF_RESERVE, args.out)
    _run_list("perf", pick(PERF), deadline, args.out)
    tune_left = [] if args.skip_tune else pick(TUNE)
    if not args.skip_flashinfer:
        try:
            from kernels_h100_flashinfer import FLASHINFER, NEED_SECONDS
        except Exception as exc:
            RESULTS["errors"].append({"section": "flashinfer", "name": "import",
                                      "error": f"{type(exc).__name__}: {exc}"})
        else:
            _run_list("flashinfer", pick(FLASHINFER), deadline, args.out, NEED_SECONDS)
    _run_list("tune", tune_left, deadline, args.out)
    RESULTS["env"]["wall_seconds"] = round(time.time() - start, 1)
    _write(args.out)
    _table()
    failed = [r for r in RESULTS["correctness"] + RESULTS["flashinfer"] if not r.get("ok", True)]
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
