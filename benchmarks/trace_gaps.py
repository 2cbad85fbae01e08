"""Where a profiled stretch's device time and idle time go, from a torch.profiler chrome trace
(``prof.export_chrome_trace``; ``with_stack=True`` adds the Python frames).

- **Device busy time per source**: each kernel or device copy is charged to the innermost
  project frame (a ``python_function`` event whose name holds ``heteroserve``, ``core/`` or
  ``platforms/``) that was running on the launching thread when it was launched, found
  through the launch's ``correlation`` id; without one, to the innermost ``cpu_op``.
- **Idle gaps**: the stretches with no device activity between the first launch and the
  last device event, each charged to what the launching thread was doing at its middle
  (the innermost project frame, else the innermost ``cpu_op``), plus the head (the host's
  first event to the first device event).

    python benchmarks/trace_gaps.py trace.json [--top 15]
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
PROJECT_MARKS = ("heteroserve", "core/", "platforms/")


@dataclass(frozen=True)
class Span:
    """One trace event: ``[start, end)`` in microseconds on thread ``tid``."""

    name: str
    start: float
    end: float
    tid: int | str


@dataclass
class GapReport:
    """Totals in milliseconds. ``busy_by_source``/``idle_by_source``: ``{source: ms}``;
    ``largest_gaps``: ``(ms, source, next device event)`` largest first; ``head_by_frame``:
    the head sampled every 10 us, ``{"innermost Python frame > innermost op": ms}``."""

    window_ms: float
    busy_ms: float
    head_ms: float
    idle_ms: float
    busy_by_source: dict[str, float] = field(default_factory=dict)
    idle_by_source: dict[str, float] = field(default_factory=dict)
    largest_gaps: list[tuple[float, str, str]] = field(default_factory=list)
    head_by_frame: dict[str, float] = field(default_factory=dict)


class _Stack:
    """Spans of one thread, queried for the innermost one covering a time."""

    def __init__(self, spans: list[Span]) -> None:
        self.spans = sorted(spans, key=lambda s: (s.start, -s.end))
        self.starts = [s.start for s in self.spans]

    def innermost(self, t: float) -> Span | None:
        """The latest-starting span with ``start <= t < end`` (nested spans start later)."""
        i = bisect.bisect_right(self.starts, t)
        for s in reversed(self.spans[max(0, i - 4096):i]):
            if s.end > t:
                return s
        return None


def _span(e: dict) -> Span:
    return Span(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["tid"])


def _spans(events: list[dict], cats: set[str], name_filter=None) -> list[Span]:
    return [_span(e) for e in events if e.get("ph") == "X" and e.get("cat") in cats
            and (name_filter is None or name_filter(e["name"]))]


def _short(frame: str) -> str:
    """``/x/heteroserve/core/layers/linear.py(88): forward`` -> ``core/layers/linear.py(88):
    forward`` (likewise a checkout's ``core/``, ``platforms/``, or ``site-packages/``)."""
    cut = [i + len(m) for m in ("heteroserve/", "site-packages/") if (i := frame.find(m)) >= 0]
    cut += [i + 1 for m in ("/core/", "/platforms/", "/benchmarks/")
            if (i := frame.find(m)) >= 0]
    return frame[min(cut):] if cut else frame


def analyse(trace: dict) -> GapReport:
    """The report of one chrome trace (see the module docstring). Raises ``ValueError`` when
    the trace holds no device events."""
    events = trace.get("traceEvents", [])
    device = sorted(((_span(e), e.get("args", {}).get("correlation")) for e in events
                     if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS),
                    key=lambda dc: dc[0].start)
    if not device:
        raise ValueError("the trace holds no device events (profile with ProfilerActivity.CUDA)")
    launches = {e.get("args", {}).get("correlation"): e for e in events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS}
    frames_by_tid: dict = defaultdict(list)
    for s in _spans(events, {"python_function"},
                    lambda n: any(m in n for m in PROJECT_MARKS)):
        frames_by_tid[s.tid].append(s)
    ops_by_tid: dict = defaultdict(list)
    for s in _spans(events, {"cpu_op"}):
        ops_by_tid[s.tid].append(s)
    frames = {t: _Stack(v) for t, v in frames_by_tid.items()}
    ops = {t: _Stack(v) for t, v in ops_by_tid.items()}

    def source(tid, t: float) -> str:
        for table in (frames, ops):
            hit = table[tid].innermost(t) if tid in table else None
            if hit is not None:
                return _short(hit.name)
        return "(no host frame)"

    busy: dict[str, float] = defaultdict(float)
    launch_tid = None
    for d, corr in device:
        launch = launches.get(corr)
        if launch is None:
            busy["(launch not traced) " + d.name[:60]] += d.end - d.start
            continue
        launch_tid = launch["tid"]
        busy[source(launch["tid"], float(launch["ts"]))] += d.end - d.start
    py_frames = _Stack([s for s in _spans(events, {"python_function"}) if s.tid == launch_tid])
    host_ops = ops.get(launch_tid, _Stack([]))
    host_start = min((s.start for s in py_frames.spans + host_ops.spans),
                     default=device[0][0].start)
    idle: dict[str, float] = defaultdict(float)
    gaps: list[tuple[float, str, str]] = []
    busy_ms = 0.0
    covered_end = device[0][0].start
    for d, _ in device:
        if d.start > covered_end:
            mid = (covered_end + d.start) / 2
            where = source(launch_tid, mid)
            idle[where] += d.start - covered_end
            gaps.append(((d.start - covered_end) / 1e3, where, d.name[:60]))
        busy_ms += max(0.0, d.end - max(d.start, covered_end)) / 1e3
        covered_end = max(covered_end, d.end)
    gaps.sort(reverse=True)
    head: dict[str, float] = defaultdict(float)
    t = host_start
    while t < device[0][0].start:
        frame, op = py_frames.innermost(t), host_ops.innermost(t)
        key = " > ".join(_short(x.name) for x in (frame, op) if x is not None)
        head[key or "(no host frame)"] += 10.0
        t += 10.0
    ms = lambda table: dict(sorted(((k, v / 1e3) for k, v in table.items()),  # noqa: E731
                                   key=lambda kv: -kv[1]))
    return GapReport(window_ms=(covered_end - host_start) / 1e3, busy_ms=busy_ms,
                     head_ms=max(0.0, device[0][0].start - host_start) / 1e3,
                     idle_ms=sum(idle.values()) / 1e3, busy_by_source=ms(busy),
                     idle_by_source=ms(idle), largest_gaps=gaps[:20], head_by_frame=ms(head))


def render(r: GapReport, top: int = 15) -> str:
    """A plain-text summary of ``r``: totals, then the ``top`` sources of busy and idle time."""
    lines = [f"window {r.window_ms:.2f} ms: device busy {r.busy_ms:.2f} ms, idle {r.idle_ms:.2f} "
             f"ms between device events, head {r.head_ms:.2f} ms (host start to first device "
             "event)", "device time by launching frame:"]
    lines += [f"  {v:9.3f} ms  {k}" for k, v in list(r.busy_by_source.items())[:top]]
    lines.append("idle time by what the launching thread was doing:")
    lines += [f"  {v:9.3f} ms  {k}" for k, v in list(r.idle_by_source.items())[:top]]
    lines.append("the head by innermost host frame (sampled every 10 us):")
    lines += [f"  {v:9.3f} ms  {k}" for k, v in list(r.head_by_frame.items())[:top]]
    lines.append("largest gaps (ms, host frame, next device event):")
    lines += [f"  {g:7.3f}  {w}  -> {n}" for g, w, n in r.largest_gaps[:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    with open(a.trace) as f:
        print(render(analyse(json.load(f)), a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
