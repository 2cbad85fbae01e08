"""Where a long prefill's time goes: one prompt of N tokens (default 8192 and 32768) through the
Llama-3.1-8B-shaped engine (dummy bf16 weights, engine defaults: chunked prefill of 8192),
timed end to end (time to first token), then once more under torch.profiler; prints the wall
time, the device-kernel time and the top kernels by device time. A third run, profiled with
Python stacks and shapes, says which frames launch the device time and what the host was
doing while the device sat idle (:mod:`trace_gaps`), and lists the slowest host ops.

Host times under the profiler are not wall-clock truth: on the H100 machine (torch 2.11,
2026-12-06) it showed three host ``aten::index`` calls of the batch builder taking 4-14 ms
each before an 8k prompt's first kernel, yet the same builder in numpy measured no better
unprofiled (the headline's median of five 8k prompts: 0.2196 s against 0.2177 s with torch's
indexing, same call). Confirm a host gap by wall-clock A/B before acting on it.

    python benchmarks/profile_prefill.py 8192,32768 > profile_prefill.txt
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llama8b import build_engine, random_prompts  # noqa: E402
from trace_gaps import analyse, render  # noqa: E402


def one_prompt(sched, rid: str, ids: list[int]) -> float:
    from heteroserve.core.scheduler import Req
    from heteroserve.core.scheduler.sampling_params import SamplingParams

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sched.add_request(Req(rid=rid, input_ids=ids, sampling_params=SamplingParams(
        max_new_tokens=1, temperature=0.0, ignore_eos=True)))
    while sched.has_work():
        sched.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def print_slow_host_ops(events, limit_us: float = 1000.0, top: int = 6) -> None:
    """The ``top`` host ops of more than ``limit_us`` of self CPU time, with their input
    shapes and the project frames of their Python stack."""
    slow = sorted((e for e in events if e.device_type == DeviceType.CPU
                   and e.self_cpu_time_total > limit_us), key=lambda e: -e.self_cpu_time_total)
    print(f"host ops over {limit_us:.0f} us of self time: {len(slow)}")
    for e in slow[:top]:
        frames = [f for f in (e.stack or []) if "core/" in f or "platforms/" in f][:4]
        print(f"  {e.self_cpu_time_total / 1e3:8.2f} ms  {e.name}  {e.input_shapes}")
        for f in frames:
            print(f"      {f}")


def main() -> int:
    lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "8192,32768").split(",")]
    runner, sched = build_engine(True, 8, 8192, 0.85)
    vocab = runner.vocab_size
    one_prompt(sched, "warm", random_prompts(1, 2048, vocab, 1)[0])
    for n in lengths:
        ids = random_prompts(1, n, vocab, n)[0]
        wall = one_prompt(sched, f"t{n}", ids)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one_prompt(sched, f"p{n}", ids)
        events = prof.key_averages()
        device_s = sum(e.self_device_time_total for e in events
                       if e.device_type == DeviceType.CUDA) / 1e6
        print(f"\n== prefill {n} tokens: TTFT {wall:.3f} s, device kernels {device_s:.3f} s "
              f"({device_s / wall:.0%} busy)")
        print(events.table(sort_by="self_device_time_total", row_limit=14,
                           max_name_column_width=70))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     with_stack=True, record_shapes=True) as prof:
            one_prompt(sched, f"s{n}", ids)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                report = analyse(json.load(f))
        print(f"\n-- prefill {n} tokens under the stack profiler --")
        print(render(report, 18))
        print_slow_host_ops(prof.events())
    return 0


if __name__ == "__main__":
    sys.exit(main())
