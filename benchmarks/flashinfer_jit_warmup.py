"""Build flashinfer's JIT modules for every attention variant the cuda conformance grid uses,
before the suite (or the engine) needs them.

flashinfer compiles one module per (prefill or decode, dtype, head size, sliding window on/off,
soft cap on/off); page size, layout, GQA ratio and lengths are runtime arguments. An sm90
prefill module is eight heavy nvcc compiles (four mask modes, paged and ragged). Built lazily
inside the suite, xdist workers each start a ninja with every core and the machine thrashes.

Each module is built the way the wrapper builds it, ``spec.build()``: its own ninja, run in
the module's build directory, so the build log the wrapper's later ``build()`` consults says
the module is up to date and nothing is recompiled. (flashinfer's ``build_jit_specs`` runs one
ninja over all modules from the JIT root; its log is not the per-module log, so every wrapper
rebuilt its module from scratch, measured on the H200.) ``--jobs`` is split between
``--at-once`` modules built side by side. An interrupted build keeps its finished objects.

Usage (on the GPU machine, flashinfer importable):
    python3 benchmarks/flashinfer_jit_warmup.py [--kind decode] [--only bf16-p1-h8:2-d128]
        [--jobs 16] [--at-once 2] [--out warmup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


def variants(platform: str, kinds: list[str], only: str | None,
             exclude: tuple[str, ...] = ()) -> dict[tuple[Any, ...], str]:
    """(kind, dtype, head size, window?, cap?) -> the first case name of the cuda grid that
    needs it, for bf16/fp16 cases (flashinfer takes no fp32) whose name contains ``only`` and
    none of ``exclude``."""
    from heteroserve.conformance.cases.attention import attention_cases
    from heteroserve.conformance.context import open_context
    from heteroserve.platforms.cuda.flashinfer_attention import (
        CUDA_CORE_DECODE_MAX_GROUP, DTYPES,
    )

    ctx = open_context(platform)
    chosen: dict[tuple[Any, ...], str] = {}
    for kind in kinds:
        for case in attention_cases(kind)(ctx):
            if (case.dtype not in DTYPES or (only and only not in case.name)
                    or any(x in case.name for x in exclude)):
                continue
            tensor_cores = case.q_heads // case.kv_heads > CUDA_CORE_DECODE_MAX_GROUP
            module = "decode" if kind == "decode" and not tensor_cores else "prefill"
            key = (module, case.dtype, case.head_size, case.sliding_window is not None,
                   case.logit_cap is not None)
            chosen.setdefault(key, f"{kind}:{case.name}")
    return chosen


def jit_spec(key: tuple[Any, ...], device: torch.device) -> Any:
    """The JitSpec flashinfer's wrapper would build for ``key`` (default positional encoding,
    int32 indices, no fp16 QK reduction; the prefill backend chosen as the wrapper's ``auto``
    chooses it)."""
    from flashinfer.jit.attention.modules import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.utils import determine_attention_backend

    module, dt, head, window, cap = key
    common = (dt, dt, dt, torch.int32, head, head, 0, window, cap)
    if module == "decode":
        return gen_batch_decode_module(*common)
    backend = determine_attention_backend(device, 0, False, False, dt, dt,
                                          head_dim_qk=head, head_dim_vo=head)
    return gen_batch_prefill_module(backend, *common, False)


def build_each(specs: list[Any], jobs: int, at_once: int) -> dict[str, float]:
    """``spec.build()`` for every spec, ``at_once`` at a time, each ninja given
    ``jobs // at_once`` jobs (flashinfer reads ``MAX_JOBS``); returns seconds per module name.
    A failed build raises after the others finish."""
    os.environ["MAX_JOBS"] = str(max(1, jobs // at_once))
    seconds: dict[str, float] = {}

    def build(spec: Any) -> None:
        start = time.perf_counter()
        spec.build()
        seconds[spec.name] = round(time.perf_counter() - start, 1)
        print(f"  built {spec.name[:90]} in {seconds[spec.name]:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        for future in [pool.submit(build, spec) for spec in specs]:
            future.result()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", default="cuda")
    parser.add_argument("--kind", action="append", choices=("extend", "decode"),
                        help="grids to cover (default both)")
    parser.add_argument("--only", default=None, help="only cases whose name contains this")
    parser.add_argument("--exclude", action="append", default=[],
                        help="skip cases whose name contains this (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--at-once", type=int, default=None,
                        help="modules built side by side (default jobs // 8, at least 1)")
    parser.add_argument("--out", default=None, help="write the modules and seconds as JSON")
    args = parser.parse_args()
    at_once = args.at_once or max(1, args.jobs // 8)

    device = torch.device("cuda", 0)
    chosen = variants(args.platform, args.kind or ["extend", "decode"], args.only,
                      tuple(args.exclude))
    specs = {key: jit_spec(key, device) for key in chosen}
    print(f"flashinfer JIT: {len(specs)} modules for the grid, {args.jobs} jobs, "
          f"{at_once} modules at once", flush=True)
    for key, spec in specs.items():
        print(f"  {spec.name}  ({chosen[key]})")
    start = time.perf_counter()
    seconds = build_each(list(specs.values()), args.jobs, at_once)
    wall = time.perf_counter() - start
    missing = [s.name for s in specs.values() if not s.jit_library_path.exists()]
    print(f"flashinfer JIT: {len(specs)} modules up to date in {wall:.0f} s; "
          f"{len(missing)} missing", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"wall_s": round(wall, 1), "jobs": args.jobs, "at_once": at_once,
                       "seconds": seconds, "cases": {specs[k].name: c for k, c in chosen.items()},
                       "missing": missing}, f, indent=1)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
