"""Build flashinfer's JIT modules for every attention variant the cuda conformance grid uses,
in one ninja run, before the suite (or the engine) needs them.

flashinfer compiles one module per (prefill or decode, dtype, head size, sliding window on/off,
soft cap on/off); page size, layout, GQA ratio and lengths are runtime arguments. An sm90
prefill module is eight heavy nvcc compiles (four mask modes, paged and ragged). Built lazily
inside the suite, xdist workers queue on one module's lock at a time; built by many processes
at once, every process starts its own ninja and the machine thrashes. Here the modules' specs
(the same ``gen_batch_prefill_module`` / ``gen_batch_decode_module`` calls the wrappers make)
go to flashinfer's ``build_jit_specs``: one ninja, one job limit, every source in parallel.
An interrupted build keeps its finished object files for the next run.

Usage (on the GPU machine, flashinfer importable):
    python3 benchmarks/flashinfer_jit_warmup.py [--kind decode] [--only bf16-p1-h8:2-d128]
        [--jobs 16] [--out warmup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch


def variants(platform: str, kinds: list[str], only: str | None) -> dict[tuple[Any, ...], str]:
    """(kind, dtype, head size, window?, cap?) -> the first case name of the cuda grid that
    needs it, for bf16/fp16 cases (flashinfer takes no fp32) whose name contains ``only``."""
    from heteroserve.conformance.cases.attention import attention_cases
    from heteroserve.conformance.context import open_context
    from heteroserve.platforms.cuda.flashinfer_attention import (
        CUDA_CORE_DECODE_MAX_GROUP, DTYPES,
    )

    ctx = open_context(platform)
    chosen: dict[tuple[Any, ...], str] = {}
    for kind in kinds:
        for case in attention_cases(kind)(ctx):
            if case.dtype not in DTYPES or (only and only not in case.name):
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", default="cuda")
    parser.add_argument("--kind", action="append", choices=("extend", "decode"),
                        help="grids to cover (default both)")
    parser.add_argument("--only", default=None, help="only cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 8)
    parser.add_argument("--out", default=None, help="write the modules and seconds as JSON")
    args = parser.parse_args()
    os.environ.setdefault("FLASHINFER_JIT_PREBUILD_MAX_JOBS", str(args.jobs))
    from flashinfer.jit.core import build_jit_specs

    device = torch.device("cuda", 0)
    chosen = variants(args.platform, args.kind or ["extend", "decode"], args.only)
    specs = {key: jit_spec(key, device) for key in chosen}
    todo = [spec for spec in specs.values() if not spec.jit_library_path.exists()]
    names = {spec.name for spec in todo}
    print(f"flashinfer JIT: {len(specs)} modules for the grid, {len(todo)} to build, "
          f"{args.jobs} jobs", flush=True)
    for key, spec in specs.items():
        print(f"  {'build' if spec.name in names else 'cached'} {spec.name}  ({chosen[key]})")
    start = time.perf_counter()
    if todo:
        build_jit_specs(todo, verbose=False, skip_prebuilt=False)
    wall = time.perf_counter() - start
    missing = [s.name for s in specs.values() if not s.jit_library_path.exists()]
    print(f"flashinfer JIT: built {len(todo)} modules in {wall:.0f} s; "
          f"{len(missing)} missing", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"wall_s": round(wall, 1), "jobs": args.jobs, "built": [s.name for s in todo],
                       "cases": {specs[k].name: c for k, c in chosen.items()},
                       "missing": missing}, f, indent=1)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
