"""The engine's periodic throughput line: bounded rate, nothing when idle, the window's
generation throughput."""

from __future__ import annotations

from heteroserve.core.runtime.throughput_log import GAUGE_INTERVAL, MIN_PERIOD_S, ThroughputLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def snap(steps: int, tokens: int, running: int = 2) -> dict[str, float]:
    return {"decode_steps": steps, "generation_tokens_total": tokens, "num_running": running,
            "kv_request_pages": 3, "kv_usage": 0.25, "num_waiting": 1}


def test_a_line_every_interval_steps_at_most_once_a_second() -> None:
    clock = Clock()
    log = ThroughputLog(interval=4, page_size=16, clock=clock)
    assert log.observe(snap(0, 0)) is None  # opens the window
    clock.now += 0.5
    assert log.observe(snap(3, 6)) is None  # 3 < 4 steps
    line = log.observe(snap(4, 8))
    assert line == ("Decode batch. #running-req: 2, #token: 48, token usage: 0.25, "
                    "gen throughput (token/s): 16.00, #queue-req: 1")
    clock.now += MIN_PERIOD_S / 2
    assert log.observe(snap(8, 16)) is None  # due by steps, too soon after the last line
    assert log.gen_throughput == 16.0  # (16 - 8) tokens / 0.5 s: measured all the same
    clock.now += MIN_PERIOD_S
    assert log.observe(snap(12, 24)) is not None


def test_idle_resets_and_disabled_logs_nothing() -> None:
    clock = Clock()
    log = ThroughputLog(interval=1, page_size=1, clock=clock)
    log.observe(snap(0, 0))
    clock.now += 2
    assert log.observe(snap(5, 10)) is not None and log.gen_throughput == 5.0
    log.idle()
    assert log.gen_throughput == 0.0
    clock.now += 1000  # idle time never dilutes the next window
    assert log.observe(snap(5, 10)) is None
    clock.now += 1
    log.observe(snap(6, 12))
    assert log.gen_throughput == 2.0
    off = ThroughputLog(interval=0, page_size=1, clock=clock)
    off.observe(snap(0, 0))
    clock.now += 4
    assert off.observe(snap(GAUGE_INTERVAL, 2 * GAUGE_INTERVAL)) is None
    assert off.gen_throughput == 2 * GAUGE_INTERVAL / 4  # the gauge still updates
