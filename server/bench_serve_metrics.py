"""What ``heteroserve bench serve`` measures per request, and the run's summary.

Definitions (SGLang bench_serving's, measured on what the client receives):

- **TTFT**: from sending the request to the first SSE event whose choice carries text.
- **ITL** (the inter-chunk gap): the gaps between consecutive SSE events with text of one
  reply. When a server merges several tokens into one event, this is a gap per event, not per
  token; ``chunks_with_text_per_token`` shows how far events and tokens differ.
- **E2E**: from sending to the end of the stream (``[DONE]`` or the connection closing).
- **TPOT**: ``(E2E - TTFT) / (generated tokens - 1)`` for replies of two tokens or more.
- **Generated tokens**: the server's ``usage.completion_tokens`` (asked for with
  ``stream_options.include_usage``); a reply without usage counts its events with text.
- Throughputs divide totals by the run's wall time (first send to last reply);
  ``concurrency`` is the sum of E2E latencies over that time.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from sending it."""

    input_len: int
    output_len: int
    text_times: list[float] = field(default_factory=list)
    events: int = 0
    latency: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    text_chars: int = 0
    error: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.text_times[0] if self.text_times else None

    @property
    def generated_tokens(self) -> int:
        """``usage.completion_tokens`` when the server sent it, else the events with text."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.text_times)

    @property
    def gaps(self) -> list[float]:
        """Inter-chunk gaps: between consecutive events with text."""
        t = self.text_times
        return [b - a for a, b in zip(t, t[1:])]

    def fail(self, kind: str, message: str) -> None:
        """Mark the request failed; ``kind`` groups errors ("http 503", "timeout", ...)."""
        if self.error is None:
            self.error_kind, self.error = kind, message


def _stats(name: str, values_s: list[float], with_max: bool = False) -> dict[str, float | None]:
    """``{name}_ms_mean``, ``_p50``, ``_p90``, ``_p99`` (None when there are no values)."""
    ms = [v * 1000.0 for v in values_s]
    out: dict[str, float | None] = {f"{name}_ms_mean": statistics.fmean(ms) if ms else None}
    for q in PERCENTILES:
        out[f"{name}_ms_p{q}"] = float(np.percentile(ms, q)) if ms else None
    if with_max:
        out[f"{name}_ms_max"] = max(ms) if ms else None
    return out


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, object]:
    """The run's metrics (see the module docstring) over ``results``; failed requests only
    count in ``failed`` and ``errors``."""
    ok = [r for r in results if r.ok]
    inp = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok)
    out = sum(r.generated_tokens for r in ok)
    chunks = sum(len(r.text_times) for r in ok)
    from_usage = sum(r.completion_tokens is not None for r in ok)
    dur = max(duration_s, 1e-9)
    e2e = [r.latency for r in ok if r.latency is not None]
    tpot = [(r.latency - r.ttft) / (r.generated_tokens - 1) for r in ok
            if r.latency is not None and r.ttft is not None and r.generated_tokens > 1]
    metrics: dict[str, object] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
        "total_input_tokens": inp, "total_output_tokens": out,
        "output_tokens_from": ("usage" if from_usage == len(ok) else
                               "chunks" if from_usage == 0 else "usage+chunks"),
        "request_throughput": len(ok) / dur, "input_throughput": inp / dur,
        "output_throughput": out / dur, "total_throughput": (inp + out) / dur,
        "concurrency": sum(e2e) / dur,
        **_stats("ttft", [r.ttft for r in ok if r.ttft is not None]),
        **_stats("tpot", tpot),
        **_stats("itl", [g for r in ok for g in r.gaps], with_max=True),
        **_stats("e2e", e2e),
        "chunks_with_text_per_reply": chunks / len(ok) if ok else None,
        "chunks_with_text_per_token": chunks / out if out else None,
        "events_without_text_per_reply": (sum(r.events - len(r.text_times) for r in ok) / len(ok)
                                          if ok else None),
        "errors": dict(Counter(r.error_kind or "error" for r in results if not r.ok)),
    }
    return metrics


def _fmt(value: object, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(m: dict[str, object], title: str) -> None:
    """Print the summary ``m`` as SGLang's bench_serving does (one value per line)."""
    rows = [
        ("Successful / failed requests", f"{m['completed']} / {m['failed']}"),
        ("Benchmark duration (s)", _fmt(m["duration_s"], ".2f")),
        ("Total input tokens", str(m["total_input_tokens"])),
        (f"Total generated tokens (from {m['output_tokens_from']})",
         str(m["total_output_tokens"])),
        ("Request throughput (req/s)", _fmt(m["request_throughput"], ".2f")),
        ("Input token throughput (tok/s)", _fmt(m["input_throughput"], ".2f")),
        ("Output token throughput (tok/s)", _fmt(m["output_throughput"], ".2f")),
        ("Total token throughput (tok/s)", _fmt(m["total_throughput"], ".2f")),
        ("Concurrency", _fmt(m["concurrency"], ".2f")),
    ]
    for name, label in (("e2e", "E2E latency"), ("ttft", "TTFT"), ("tpot", "TPOT"),
                        ("itl", "ITL (inter-chunk gap)")):
        rows.append((f"{label} mean / p50 / p90 / p99 (ms)", " / ".join(
            _fmt(m[f"{name}_ms_{k}"], ".2f") for k in ("mean", "p50", "p90", "p99"))))
    rows += [
        ("SSE chunks with text per reply", _fmt(m["chunks_with_text_per_reply"], ".2f")),
        ("SSE chunks with text per generated token", _fmt(m["chunks_with_text_per_token"], ".3f")),
        ("SSE events without text per reply", _fmt(m["events_without_text_per_reply"], ".2f")),
    ]
    errors = m["errors"]
    if isinstance(errors, dict) and errors:
        rows.append(("Errors", ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))))
    width = max(len(k) for k, _ in rows) + 2
    print(f" {title} ".center(width + 24, "="))
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")
    print("=" * (width + 24))
