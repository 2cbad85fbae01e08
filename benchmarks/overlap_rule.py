"""Headline workloads (``bench_headline.py``) under the overlap scheduler's chaining rule
before 2026-12-05, for a side-by-side run against the default: ``python3
benchmarks/overlap_rule.py sync_when_waiting --out X.json [--workloads ...]``.

``sync_when_waiting``: a decode step chains onto the previous one only when no request
waits (``core/scheduler/overlap.py`` before ``admission_blocked``), so in an offline run
whose queue outlasts ``max_running_requests`` every decode step but the last wave's reads
its tokens back before the next one is built. The JSON records the rule as
``overlap_rule``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_headline  # noqa: E402

from heteroserve.core.scheduler import overlap  # noqa: E402

#: rule -> replacement of overlap.admission_blocked
RULES = {"sync_when_waiting": lambda sched: not sched.waiting}


def main() -> int:
    rule = sys.argv[1]
    overlap.admission_blocked = RULES[rule]
    return bench_headline.main_tagged(sys.argv[2:], {"overlap_rule": rule})

if __name__ == "__main__":
    raise SystemExit(main())
