"""Prometheus metrics for ``GET /metrics``.

Two sources, one registry per app (so several apps in one process never collide):

- :class:`EngineCollector` reads ``EngineClient.get_stats()`` at scrape time: running and
  queued requests, KV pool use, prefix-cache hit rate (gauges) and the frontend's request and
  token counters.
- :class:`ServerMetrics` holds latency histograms observed as requests finish: time to first
  token, inter-token latency (one observation per generated token after the first, so
  ``sum / count`` is the mean time per output token) and end-to-end latency.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heteroserve.core.runtime.outputs import FinishKind, RequestOutput

PREFIX = "heteroserve"

# gauge name -> (help, stats keys tried in order)
_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "num_requests_running": ("Requests being decoded or prefilled now.",
                             ("num_running_reqs", "num_running", "running_requests")),
    "num_requests_waiting": ("Requests queued in the scheduler, not yet running.",
                             ("num_queue_reqs", "num_waiting_reqs", "num_waiting",
                              "waiting_requests")),
    "kv_cache_usage_ratio": ("Fraction of KV-pool slots held by requests (0..1).",
                             ("token_usage", "kv_usage", "kv_cache_usage")),
    "kv_used_tokens": ("KV-pool slots held by requests (excludes evictable cached prefixes).",
                       ("num_used_tokens", "kv_used_tokens", "used_tokens")),
    "kv_cached_tokens": ("KV-pool slots held only by the prefix cache (evictable).",
                         ("num_cached_tokens", "kv_cached_tokens", "evictable_tokens",
                          "evictable_size")),
    "cache_hit_rate": ("Prefix-cache hit rate over recent prompts (0..1).",
                       ("cache_hit_rate",)),
}

# counter name -> (help, frontend counter key)
_COUNTERS: dict[str, tuple[str, str]] = {
    "requests": ("Generation requests sent to the engine (each choice of n counts).",
                 "num_requests_total"),
    "requests_finished": ("Generation requests finished (any reason).", "num_finished_total"),
    "requests_aborted": ("Generation requests aborted (client gone, abort call, shutdown).",
                         "num_aborted_total"),
    "prompt_tokens": ("Prompt tokens of requests sent to the engine.", "prompt_tokens_total"),
    "generation_tokens": ("Tokens generated.", "generation_tokens_total"),
    "cached_tokens": ("Prompt tokens served from the prefix cache.", "cached_tokens_total"),
}

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


def _number(stats: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = stats.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class EngineCollector(Collector):
    """Reads the engine client's stats at each scrape (see the module docstring). A gauge whose
    stats key the scheduler does not report is omitted; ``kv_total_tokens`` and
    ``engine_alive`` are always present."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        stats = self.client.get_stats()
        for name, (doc, keys) in _GAUGES.items():
            value = _number(stats, keys)
            if value is None and name == "kv_cache_usage_ratio":
                used, total = _number(stats, _GAUGES["kv_used_tokens"][1]), \
                    _number(stats, ("max_total_tokens",))
                value = used / total if used is not None and total else None
            if value is None and name == "cache_hit_rate":
                prompt = float(stats.get("prompt_tokens_total") or 0)
                value = float(stats.get("cached_tokens_total") or 0) / prompt if prompt else 0.0
            if value is not None:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        yield GaugeMetricFamily(f"{PREFIX}_kv_total_tokens", "KV-pool size in tokens.",
                                value=float(stats.get("max_total_tokens") or 0))
        yield GaugeMetricFamily(f"{PREFIX}_num_requests_inflight",
                                "Requests the frontend is waiting on (all states).",
                                value=float(stats.get("num_inflight") or 0))
        yield GaugeMetricFamily(f"{PREFIX}_engine_alive", "1 while the engine process serves.",
                                value=1.0 if self.client.is_alive() else 0.0)
        for name, (doc, key) in _COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc,
                                      value=float(stats.get(key) or 0))


class ServerMetrics:
    """The metrics registry of one app: engine gauges and counters plus latency histograms."""

    def __init__(self, client: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(client))
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds",
                             "Time from request arrival to its last token.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record a finished choice from its last output (``ttft``, ``e2e_latency``, usage);
        aborted and failed choices record nothing."""
        if out.finish is None or out.finish.kind in (FinishKind.ABORT, FinishKind.ERROR):
            return
        e2e, ttft = out.e2e_latency, out.ttft
        if e2e is not None:
            self.e2e.observe(max(0.0, e2e))
        if ttft is not None:
            self.ttft.observe(max(0.0, ttft))
            gaps = out.usage.completion_tokens - 1
            if gaps > 0 and e2e is not None:
                per_token = max(0.0, e2e - ttft) / gaps
                for _ in range(gaps):
                    self.itl.observe(per_token)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
