"""The metrics ``GET /metrics`` serves, as data: one row per series with its kind, its
source, its buckets and its names under vLLM's and SGLang's conventions.

Every series is exposed as ``heteroserve:<name>`` with a ``model_name`` label; with
``--metrics-compat vllm|sglang`` the same samples are exposed again under the names in that
engine's column (several names where that engine has renamed a metric across releases), so
dashboards built for it work unchanged. Counter names are family names: the exposition adds
``_total`` to their samples, as Prometheus clients do. Names and buckets follow vLLM's v1
``PrometheusStatLogger`` and SGLang's ``metrics/collector.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

PREFIX = "heteroserve"
COMPAT = ("vllm", "sglang")

#: labels each engine's own exposition adds besides ``model_name`` (constant for one engine)
COMPAT_LABELS: dict[str, dict[str, str]] = {"vllm": {"engine": "0"}, "sglang": {}}

#: finish reasons of ``request_success`` (every one is exposed, at 0 until it happens)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Kind(str, enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


class Source(str, enum.Enum):
    """Where a value comes from: the engine client's stats snapshot (``STATS``, read at
    scrape time), the server observing requests as they finish (``REQUEST``), or the
    client itself (``ALIVE``: whether the engine process serves)."""

    STATS = "stats"
    REQUEST = "request"
    ALIVE = "alive"


@dataclass(frozen=True)
class MetricSpec:
    """One series. ``stat``: the stats key (``STATS`` source; for ``request_success`` the
    per-reason dict); ``buckets``: histogram bucket bounds (``None``: token counts, 1-2-5
    up to the context length); ``vllm`` / ``sglang``: names under that engine (empty: it
    has none)."""

    name: str
    kind: Kind
    doc: str
    source: Source = Source.STATS
    stat: str = ""
    buckets: tuple[float, ...] | None = ()
    vllm: tuple[str, ...] = ()
    sglang: tuple[str, ...] = ()

    def compat_names(self, flavour: str) -> tuple[str, ...]:
        return self.vllm if flavour == "vllm" else self.sglang if flavour == "sglang" else ()


TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                         0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                           20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
                           7680.0)

G, C, H = Kind.GAUGE, Kind.COUNTER, Kind.HISTOGRAM
REQ = Source.REQUEST

METRICS: tuple[MetricSpec, ...] = (
    # -- scheduler state (gauges) -------------------------------------------------------------
    MetricSpec("num_requests_running", G, "Requests in the running batch (prefilling or "
               "decoding).", stat="num_running",
               vllm=("num_requests_running",), sglang=("num_running_reqs",)),
    MetricSpec("num_requests_waiting", G, "Requests queued in the scheduler, not yet "
               "running.", stat="num_waiting",
               vllm=("num_requests_waiting",), sglang=("num_queue_reqs",)),
    MetricSpec("num_requests_inflight", G, "Requests the server is waiting on (queued in the "
               "server or the scheduler, or running).", stat="num_inflight"),
    MetricSpec("kv_cache_usage_perc", G, "Fraction of the KV pool held by requests (0..1; "
               "evictable prefix-cache entries count as free).", stat="kv_usage",
               vllm=("kv_cache_usage_perc", "gpu_cache_usage_perc"), sglang=("token_usage",)),
    MetricSpec("kv_used_tokens", G, "KV-pool slots held by requests (evictable prefix-cache "
               "entries excluded).", stat="kv_used_tokens", sglang=("num_used_tokens",)),
    MetricSpec("kv_evictable_tokens", G, "KV-pool slots held only by the prefix cache "
               "(reclaimed when needed).", stat="kv_evictable_tokens"),
    MetricSpec("kv_total_tokens", G, "KV-pool size in tokens.", stat="max_total_tokens",
               sglang=("max_total_num_tokens",)),
    MetricSpec("cache_hit_rate", G, "Prompt tokens found in the prefix cache over prompt "
               "tokens looked up, since start (0..1).", stat="cache_hit_rate",
               sglang=("cache_hit_rate",)),
    MetricSpec("gen_throughput", G, "Generated tokens per second over the last decode "
               "window (0 when idle).", stat="gen_throughput", sglang=("gen_throughput",)),
    MetricSpec("engine_alive", G, "1 while the engine process serves.", source=Source.ALIVE),
    # -- counters ------------------------------------------------------------------------------
    MetricSpec("prefix_cache_queries", C, "Prompt tokens looked up in the prefix cache.",
               stat="prefix_cache_queries_total",
               vllm=("prefix_cache_queries", "gpu_prefix_cache_queries")),
    MetricSpec("prefix_cache_hits", C, "Prompt tokens found in the prefix cache.",
               stat="prefix_cache_hits_total",
               vllm=("prefix_cache_hits", "gpu_prefix_cache_hits")),
    MetricSpec("num_preemptions", C, "Requests preempted (retracted) to free KV-pool room; "
               "they resume later.", stat="num_retractions",
               vllm=("num_preemptions",), sglang=("num_retracted_requests",)),
    MetricSpec("prompt_tokens", C, "Prompt tokens of requests sent to the engine (each "
               "choice of n counts).", stat="prompt_tokens_total",
               vllm=("prompt_tokens",), sglang=("prompt_tokens",)),
    MetricSpec("generation_tokens", C, "Tokens generated.", stat="generation_tokens_total",
               vllm=("generation_tokens",), sglang=("generation_tokens",)),
    MetricSpec("cached_tokens", C, "Prompt tokens of finished requests served from the "
               "prefix cache.", stat="cached_tokens_total", sglang=("cached_tokens",)),
    MetricSpec("requests", C, "Requests sent to the engine (each choice of n counts).",
               stat="num_requests_total", sglang=("num_requests",)),
    MetricSpec("requests_finished", C, "Requests finished, any reason.",
               stat="num_finished_total"),
    MetricSpec("requests_aborted", C, "Requests aborted (client gone, abort call, shutdown).",
               stat="num_aborted_total", sglang=("num_aborted_requests",)),
    MetricSpec("request_success", C, "Requests finished, by finished_reason (stop, length, "
               "abort, error).", stat="finished_by_reason", vllm=("request_success",)),
    # -- per-request histograms (requests that completed: stop or length) ---------------------
    MetricSpec("time_to_first_token_seconds", H, "Time from request arrival to its first "
               "generated token.", source=REQ, buckets=TTFT_BUCKETS,
               vllm=("time_to_first_token_seconds",), sglang=("time_to_first_token_seconds",)),
    MetricSpec("time_per_output_token_seconds", H, "Mean time per generated token after the "
               "first, one observation per request.", source=REQ,
               buckets=TOKEN_LATENCY_BUCKETS, vllm=("time_per_output_token_seconds",)),
    MetricSpec("inter_token_latency_seconds", H, "Time between consecutive generated tokens "
               "as the server receives them, one observation per token.", source=REQ,
               buckets=TOKEN_LATENCY_BUCKETS, vllm=("inter_token_latency_seconds",),
               sglang=("inter_token_latency_seconds",)),
    MetricSpec("e2e_request_latency_seconds", H, "Time from request arrival to its last "
               "token.", source=REQ, buckets=REQUEST_LATENCY_BUCKETS,
               vllm=("e2e_request_latency_seconds",), sglang=("e2e_request_latency_seconds",)),
    MetricSpec("request_queue_time_seconds", H, "Time a request waited in the scheduler's "
               "queue before it was first scheduled.", source=REQ,
               buckets=REQUEST_LATENCY_BUCKETS, vllm=("request_queue_time_seconds",),
               sglang=("queue_time_seconds",)),
    MetricSpec("request_prompt_tokens", H, "Prompt tokens per request.", source=REQ,
               buckets=None, vllm=("request_prompt_tokens",),
               sglang=("prompt_tokens_histogram",)),
    MetricSpec("request_generation_tokens", H, "Generated tokens per request.", source=REQ,
               buckets=None, vllm=("request_generation_tokens",),
               sglang=("generation_tokens_histogram",)),
)


def token_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (as vLLM's token-count histograms)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out) or (1.0,)
            out.append(float(m * scale))
        scale *= 10
