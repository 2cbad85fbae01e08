"""Measure the two ceilings of the device in the same run as a benchmark: copy bandwidth
(bytes read + written per second by a large device-to-device copy) and the bf16 matmul rate.

``device`` defaults to ``"cuda"`` (timed with device events, the median iteration). Any other
device (the cpu smoke runs) is timed by the calling thread's CPU time, the fastest iteration:
on a shared host that is what the work costs when the others leave it alone; it is the
work's whole cost only with one intra-op thread (``torch.set_num_threads(1)``).
"""

from __future__ import annotations

import time

import torch


def _time_ms(fn, iters: int, device: str = "cuda") -> float:
    if device != "cuda":
        fn()
        times = []
        for _ in range(iters):
            t0 = time.thread_time()
            fn()
            times.append((time.thread_time() - t0) * 1e3)
        return min(times)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(num_bytes: int = 4 << 30, iters: int = 10, device: str = "cuda") -> float:
    """Bytes/s moved (read + write) by a device-to-device copy of ``num_bytes``."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters, device)
    del src, dst
    return 2 * num_bytes / (ms / 1e3)


def matmul_rate(n: int = 8192, iters: int = 10, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an ``n x n x n`` product of random ``dtype`` matrices (bf16 by default)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = _time_ms(lambda: a @ b, iters, device)
    return 2 * n ** 3 / (ms / 1e3)


def graph_us(calls: list, rounds: int = 5) -> float:
    """Microseconds per call when every call of ``calls`` (zero-argument callables) is
    replayed from one CUDA graph, median of ``rounds`` replays: the time a decode graph sees,
    without host launch cost. The calls run once outside the capture first (compilation)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]
