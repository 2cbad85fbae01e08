"""Where a decode step's time goes: torch.profiler over steady-state decode steps of the
Llama-3.1-8B-shaped model (dummy bf16 weights), at batch 1 and at batch 256 with 1 K context.
Prints, per case, wall time per step, device (CUDA kernel) time per step, and the top
kernels. Usage: python benchmarks/profile_llama8b.py [1,256] > profile.txt (the batch sizes to
profile; both by default)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llama8b import build_engine, random_prompts  # noqa: E402


def _drive_until_decoding(sched, n: int, inp: int, out: int, vocab: int) -> None:
    from heteroserve.core.scheduler import Req
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    for i, ids in enumerate(random_prompts(n, inp, vocab, 11)):
        sched.add_request(Req(rid=f"p{n}-{i}", input_ids=ids, sampling_params=SamplingParams(
            max_new_tokens=out, temperature=0.0, ignore_eos=True)))
    while sched.waiting or any(not r.prefilled for r in sched.running):
        sched.step()
    for _ in range(5):
        sched.step()


def profile_case(name: str, sched, runner, n: int, inp: int, steps: int) -> None:
    _drive_until_decoding(sched, n, inp, steps + 40, runner.vocab_size)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        sched.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sched.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA) / steps
    print(f"\n== {name}: batch {n}, context ~{inp}: wall {wall * 1e3:.2f} ms/step, "
          f"device kernels {device_us / 1e3:.2f} ms/step ({device_us / 1e3 / (wall * 1e3):.0%} busy)")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    while sched.has_work():
        sched.step()


def main() -> int:
    cases = sys.argv[1].split(",") if len(sys.argv) > 1 else ["1", "256"]
    runner, sched = build_engine(False, 256, 8192, 0.80)
    if "1" in cases:
        profile_case("decode batch 1", sched, runner, 1, 128, 30)
    if "256" in cases:
        profile_case("decode batch 256", sched, runner, 256, 1024, 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
