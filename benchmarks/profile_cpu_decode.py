"""Profile decode steps of a CPU model with torch.profiler and write the op table.

    python benchmarks/profile_cpu_decode.py --model small --dtype bfloat16 --batch 1 \
        --out benchmarks/results/profile_cpu_small_bf16_decode1.txt

Prefills ``batch`` 128-token prompts, then records ``--steps`` decode steps (one scheduler
step each) and writes the ops sorted by self CPU time, plus the per-step wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_models import build_engine, random_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--torch-compile", action="store_true", help="--enable-torch-compile")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from heteroserve.core.scheduler import Req
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    runner, sched = build_engine(a.model, a.dtype, torch_compile=a.torch_compile)
    for i, ids in enumerate(random_prompts(a.batch, 128, runner.vocab_size, 0)):
        sp = SamplingParams(max_new_tokens=a.steps + 20, temperature=0.0, ignore_eos=True)
        sched.add_request(Req(rid=f"p{i}", input_ids=ids, sampling_params=sp))
    for _ in range(10):  # prefill + warm decode steps
        sched.step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            sched.step()
    wall = (time.perf_counter() - t0) / a.steps
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    head = (f"model {a.model} dtype {a.dtype} batch {a.batch}: {a.steps} decode steps, "
            f"{wall * 1e3:.2f} ms/step under the profiler; torch threads "
            f"{torch.get_num_threads()}; torch.compile {runner.compiled_with}; machine shared with other jobs\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
