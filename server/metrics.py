"""Prometheus metrics for ``GET /metrics``, built from the table in
:mod:`heteroserve.server.metrics_table`.

One registry per app (so several apps in one process never collide) holding one collector:

- gauges and counters are read from ``EngineClient.get_stats()`` at scrape time (the
  scheduler's snapshot, refreshed a few times a second while busy and once when it goes
  idle, plus the frontend's request and token counters);
- histograms are observed by :meth:`ServerMetrics.observe` as request outputs pass through
  the server: inter-token gaps on every output, the per-request ones (TTFT, time per output
  token, end-to-end latency, queue time, prompt and generation token counts) when a request
  completes (finish reason ``stop`` or ``length``).

Every series is ``heteroserve:<name>{model_name=...}``; ``compat`` (``--metrics-compat``)
repeats the same samples under vLLM's or SGLang's names and labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heteroserve.core.runtime.outputs import FinishKind, RequestOutput
from heteroserve.server.metrics_table import (
    COMPAT_LABELS, FINISH_REASONS, METRICS, PREFIX, Kind, MetricSpec, Source, token_buckets,
)


def _number(stats: dict[str, Any], key: str) -> float:
    value = stats.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return 0.0


def _renamed(family: Metric, name: str, extra: dict[str, str]) -> Metric:
    """``family``'s samples under ``name`` with ``extra`` labels added."""
    out = Metric(name, family.documentation, family.type)
    for s in family.samples:
        out.add_sample(name + s.name[len(family.name):], {**s.labels, **extra}, s.value,
                       s.timestamp, s.exemplar)
    return out


class _Collector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics.families())


class ServerMetrics:
    """The metrics of one app. ``client``: an ``EngineClient`` (or its interface:
    ``get_stats()``, ``is_alive()``); ``model_name``: the ``model_name`` label;
    ``max_context_len`` bounds the token-count buckets; ``compat``: ``"vllm"``,
    ``"sglang"`` or ``None``."""

    def __init__(self, client: Any, model_name: str, max_context_len: int,
                 compat: str | None = None) -> None:
        self.client, self.model_name, self.compat = client, model_name, compat
        self.labels = {"model_name": model_name}
        self._histograms: dict[str, Histogram] = {}
        for spec in METRICS:
            if spec.kind is Kind.HISTOGRAM:
                buckets = spec.buckets if spec.buckets is not None \
                    else token_buckets(max_context_len)
                # not registered anywhere: families() renders it (under every name)
                hist = Histogram(f"{PREFIX}:{spec.name}", spec.doc, ["model_name"],
                                 registry=None, buckets=buckets)
                hist.labels(model_name)  # the series exists (all zero) before any request
                self._histograms[spec.name] = hist
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- observing ------------------------------------------------------------------------------
    def _observe(self, name: str, value: float) -> None:
        self._histograms[name].labels(self.model_name).observe(max(0.0, value))

    def observe(self, out: RequestOutput) -> None:
        """Record one output of a choice: its inter-token gaps, and on a completed choice's
        last output (``stop`` / ``length``) the per-request histograms. Aborted and failed
        choices add their token gaps only."""
        for gap in out.token_gaps:
            self._observe("inter_token_latency_seconds", gap)
        if out.finish is None or out.finish.kind in (FinishKind.ABORT, FinishKind.ERROR):
            return
        usage = out.usage
        self._observe("request_prompt_tokens", usage.prompt_tokens)
        self._observe("request_generation_tokens", usage.completion_tokens)
        if out.queue_time is not None:
            self._observe("request_queue_time_seconds", out.queue_time)
        if out.e2e_latency is not None:
            self._observe("e2e_request_latency_seconds", out.e2e_latency)
        if out.ttft is not None:
            self._observe("time_to_first_token_seconds", out.ttft)
            if usage.completion_tokens > 1 and out.e2e_latency is not None:
                self._observe("time_per_output_token_seconds",
                              (out.e2e_latency - out.ttft) / (usage.completion_tokens - 1))

    # -- exposition -----------------------------------------------------------------------------
    def _family(self, spec: MetricSpec, stats: dict[str, Any]) -> Metric:
        name = f"{PREFIX}:{spec.name}"
        if spec.kind is Kind.HISTOGRAM:
            family = next(iter(self._histograms[spec.name].collect()))
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            return family
        if spec.kind is Kind.GAUGE:
            family = GaugeMetricFamily(name, spec.doc, labels=["model_name"])
            value = (1.0 if self.client.is_alive() else 0.0) if spec.source is Source.ALIVE \
                else _number(stats, spec.stat)
            family.add_metric([self.model_name], value)
            return family
        if spec.name == "request_success":
            family = CounterMetricFamily(name, spec.doc, labels=["model_name", "finished_reason"])
            by_reason = stats.get(spec.stat) or {}
            for reason in FINISH_REASONS:
                family.add_metric([self.model_name, reason], float(by_reason.get(reason, 0)))
            return family
        family = CounterMetricFamily(name, spec.doc, labels=["model_name"])
        family.add_metric([self.model_name], _number(stats, spec.stat))
        return family

    def families(self) -> list[Metric]:
        """Every metric family of one scrape: ours, then the ``compat`` engine's names."""
        stats = self.client.get_stats()
        ours = [(spec, self._family(spec, stats)) for spec in METRICS]
        out = [family for _, family in ours]
        if self.compat is not None:
            out += list(self._compat(ours, self.compat))
        return out

    @staticmethod
    def _compat(ours: Iterable[tuple[MetricSpec, Metric]], flavour: str) -> Iterator[Metric]:
        extra = COMPAT_LABELS[flavour]
        for spec, family in ours:
            for alt in spec.compat_names(flavour):
                yield _renamed(family, f"{flavour}:{alt}", extra)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
