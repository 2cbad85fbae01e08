"""The engine's periodic throughput line (as SGLang's ``Decode batch.`` log line).

While the scheduler decodes, one INFO line every ``--decode-log-interval`` decode steps, and
never more than one per :data:`MIN_PERIOD_S`; nothing while idle. The same window gives the
generation throughput that the metrics report (``gen_throughput``, 0 when idle).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

MIN_PERIOD_S = 1.0
#: decode steps per throughput window when the log line is off (the gauge still updates)
GAUGE_INTERVAL = 40


class ThroughputLog:
    """Feed it every stats snapshot of a busy scheduler (:meth:`observe`) and tell it when
    the scheduler goes idle (:meth:`idle`). ``interval``: decode steps between lines (0: no
    line, the throughput is still measured); ``page_size`` turns KV pages into tokens."""

    def __init__(self, interval: int, page_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.page_size, self.clock = interval, page_size, clock
        self.gen_throughput = 0.0
        self._start: tuple[float, int, int] | None = None  # window start: time, steps, tokens
        self._last_line = float("-inf")

    def idle(self) -> None:
        """The scheduler has no work: the throughput reads 0 and the next window starts at
        the next busy snapshot (idle time never dilutes it)."""
        self.gen_throughput = 0.0
        self._start = None

    def observe(self, stats: Mapping[str, float]) -> str | None:
        """Account a snapshot (``decode_steps``, ``generation_tokens_total``,
        ``num_running``, ``kv_request_pages``, ``kv_usage``, ``num_waiting``); returns the
        line to log when one is due, else None."""
        now = self.clock()
        steps, tokens = int(stats["decode_steps"]), int(stats["generation_tokens_total"])
        if self._start is None:
            self._start = (now, steps, tokens)
            return None
        t0, steps0, tokens0 = self._start
        every = self.interval or GAUGE_INTERVAL
        if steps - steps0 < every or now <= t0:
            return None
        self.gen_throughput = (tokens - tokens0) / (now - t0)
        self._start = (now, steps, tokens)
        if not self.interval or now - self._last_line < MIN_PERIOD_S:
            return None
        self._last_line = now
        return (f"Decode batch. #running-req: {int(stats['num_running'])}, "
                f"#token: {int(stats['kv_request_pages']) * self.page_size}, "
                f"token usage: {float(stats['kv_usage']):.2f}, "
                f"gen throughput (token/s): {self.gen_throughput:.2f}, "
                f"#queue-req: {int(stats['num_waiting'])}")
