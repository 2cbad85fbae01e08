"""Reporting helpers of bench_headline.py: the top-kernels table of a torch.profiler run, and
PNG plots of each result next to its floor (matplotlib, optional: no plot without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def profile_top_kernels(fn: Callable[[], object], with_device: bool, rows: int = 20) -> dict:
    """Run ``fn`` under torch.profiler and return where the time went: the ``rows`` events
    with the most self time, on the device (kernels) when ``with_device``, else on the host
    (operators). ``{"sort_by", "wall_s", "busy_s", "top": [{"name", "calls", "self_ms",
    "share"}], "table"}``; ``share`` is of ``busy_s`` (the summed self time)."""
    import time

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if with_device else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    if with_device:
        attr = "self_device_time_total"
        kept = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        attr = "self_cpu_time_total"
        kept = list(events)
    busy_us = sum(getattr(e, attr) for e in kept) or 1.0
    kept.sort(key=lambda e: getattr(e, attr), reverse=True)
    top = [{"name": e.key[:160], "calls": e.count, "self_ms": getattr(e, attr) / 1e3,
            "share": getattr(e, attr) / busy_us} for e in kept[:rows]]
    return {"sort_by": attr, "wall_s": wall, "busy_s": busy_us / 1e6, "top": top,
            "table": events.table(sort_by=attr, row_limit=rows, max_name_column_width=80)}


def pyplot_or_none():
    """``matplotlib.pyplot`` on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_workload(name: str, entry: dict, device: str, path: Path) -> bool:
    """Two bars, the measured value and its floor (same unit); False without matplotlib."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 2.4))
    ax.barh(["floor", "measured"], [entry["floor"], entry["value"]], color=["#999999", "#1f77b4"])
    ax.set_xlabel(entry["unit"])
    better = "lower" if entry["unit"] == "s" else "higher"
    ax.set_title(f"{name}: {100 * entry['fraction']:.0f}% of floor ({better} is better)\n{device}",
                 fontsize=9)
    for y, v in enumerate([entry["floor"], entry["value"]]):
        ax.text(v, y, f" {v:,.3g}", va="center", fontsize=8)
    ax.set_xlim(0, 1.25 * max(entry["floor"], entry["value"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_summary(workloads: dict, device: str, path: Path) -> bool:
    """Every workload's fraction of its floor, with its target where one is set."""
    plt = pyplot_or_none()
    if plt is None or not workloads:
        return False
    names = list(workloads)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.barh(names, [100 * workloads[n]["fraction"] for n in names], color="#1f77b4")
    for y, n in enumerate(names):
        target = workloads[n].get("target")
        if target:
            ax.plot([100 * target] * 2, [y - 0.4, y + 0.4], color="red")
        ax.text(100 * workloads[n]["fraction"], y, f" {100 * workloads[n]['fraction']:.0f}%",
                va="center", fontsize=8)
    ax.axvline(100, color="#999999", linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel("% of floor / roofline (red: target)")
    ax.set_title(device, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

