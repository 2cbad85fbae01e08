"""benchmarks/trace_gaps.py on hand-written chrome traces: busy time charged to the launching
project frame, idle gaps to what the host was doing, the head before the first kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from trace_gaps import analyse, render  # noqa: E402


def _x(cat: str, name: str, ts: float, dur: float, tid: int, corr: int | None = None) -> dict:
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def _trace() -> dict:
    host, gpu = 1, 7
    return {"traceEvents": [
        _x("python_function", "/x/heteroserve/core/scheduler/scheduler.py(10): step", 0, 100, host),
        _x("python_function", "/x/heteroserve/core/model_runner/batch_builder.py(5): build", 0, 20,
           host),
        _x("python_function", "/x/heteroserve/core/layers/linear.py(88): forward", 20, 10, host),
        _x("cpu_op", "aten::mm", 22, 5, host),
        _x("cuda_runtime", "cudaLaunchKernel", 23, 2, host, corr=1),
        _x("python_function", "/x/heteroserve/platforms/triton/norm.py(3): rms_norm", 30, 10, host),
        _x("cuda_driver", "cuLaunchKernelEx", 31, 2, host, corr=2),
        _x("python_function", "/x/heteroserve/core/scheduler/scheduler.py(50): sample", 60, 30,
           host),
        _x("cuda_runtime", "cudaLaunchKernel", 61, 2, host, corr=3),
        _x("kernel", "gemm", 25, 20, gpu, corr=1),       # 25-45
        _x("kernel", "rms", 45, 5, gpu, corr=2),          # 45-50, then idle 50-62
        _x("kernel", "sampler", 62, 10, gpu, corr=3),     # 62-72
    ]}


def test_busy_and_idle_are_charged_to_the_project_frames() -> None:
    r = analyse(_trace())
    assert r.busy_ms == pytest.approx(0.035)
    assert r.head_ms == pytest.approx(0.025)
    assert r.idle_ms == pytest.approx(0.012)
    assert r.window_ms == pytest.approx(0.072)
    assert r.busy_by_source == pytest.approx({"core/layers/linear.py(88): forward": 0.020,
                                              "core/scheduler/scheduler.py(50): sample": 0.010,
                                              "platforms/triton/norm.py(3): rms_norm": 0.005})
    # the gap 50-62 has its middle (56) inside step() only
    assert r.idle_by_source == pytest.approx({"core/scheduler/scheduler.py(10): step": 0.012})
    assert r.largest_gaps[0][2] == "sampler"
    assert r.head_by_frame == pytest.approx({
        "core/model_runner/batch_builder.py(5): build": 0.020,
        "core/layers/linear.py(88): forward": 0.010})  # samples at 0, 10 and 20 (mm from 22)
    assert "device busy 0.04 ms" in render(r)


def test_overlapping_device_events_count_once() -> None:
    t = _trace()
    t["traceEvents"].append(_x("gpu_memcpy", "Memcpy DtoD", 30, 10, 8, corr=99))
    r = analyse(t)
    assert r.busy_ms == pytest.approx(0.035)
    assert any(k.startswith("(launch not traced)") for k in r.busy_by_source)


def test_a_trace_without_device_events_is_refused() -> None:
    with pytest.raises(ValueError, match="no device events"):
        analyse({"traceEvents": [_x("cpu_op", "aten::mm", 0, 5, 1)]})
