"""Certification tiers: named levels a conformance report states.

Each test module of the suite belongs to one tier:

- ``correct``: every op's numerics against float64 oracles (norms, activations, rotary, MoE,
  linear methods, attention, bitmask, the model-level greedy check), poisoned outputs,
  determinism, non-contiguous inputs and error inputs (a kernel given what it refuses raises).
- ``graph-safe``: capture and replay at fixed and grown lengths equal eager.
- ``distributed``: every collective of the platform's communicator at world sizes 1, 2 and 4.
- ``sampling``: the sampling op's support rules and chi-square tests of its draws against the
  oracle distribution (temperature, top-k, top-p, min-p; masked tokens never drawn).
- ``performance``: optional (``--conformance-performance FRACTION``): memory-bound ops move
  bytes at ``FRACTION`` of the device's measured copy bandwidth; ``not run`` unless asked for.

A tier is ``passed`` when at least one of its tests passed and none failed; in a tier of
:data:`NO_SKIP_TIERS` a skipped test (too few devices for world size 4) makes it ``incomplete``
instead, since the skipped cases are what the tier certifies. A report's ``tier_reached`` lists
the passed tiers, and is empty unless ``correct`` passed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Tier(str, enum.Enum):
    CORRECT = "correct"
    GRAPH_SAFE = "graph-safe"
    DISTRIBUTED = "distributed"
    SAMPLING = "sampling"
    PERFORMANCE = "performance"


#: test module (file stem) -> tier; every other module of the suite is ``correct``
MODULE_TIERS: dict[str, Tier] = {
    "test_graph": Tier.GRAPH_SAFE,
    "test_graph_lengths": Tier.GRAPH_SAFE,
    "test_communicator": Tier.DISTRIBUTED,
    "test_distributed": Tier.DISTRIBUTED,
    "test_sampling": Tier.SAMPLING,
    "test_sampling_stats": Tier.SAMPLING,
    "test_performance": Tier.PERFORMANCE,
}


#: tiers whose every case must run: a skip there means the level was not shown
NO_SKIP_TIERS: frozenset[str] = frozenset({Tier.DISTRIBUTED.value})


def tier_of(module_stem: str) -> Tier:
    """The tier of the suite's test module ``module_stem`` (``test_norm`` -> ``correct``)."""
    return MODULE_TIERS.get(module_stem, Tier.CORRECT)


def summarize(outcomes: Iterable[tuple[str, str]]) -> dict[str, dict[str, int | str]]:
    """``(tier, outcome)`` pairs -> per tier ``{"status", "passed", "failed", "skipped"}``;
    status is ``passed``, ``failed``, ``incomplete`` (a skip in a tier of
    :data:`NO_SKIP_TIERS`), ``skipped`` (only skips) or ``not run``."""
    counts = {t.value: {"passed": 0, "failed": 0, "skipped": 0} for t in Tier}
    for tier, outcome in outcomes:
        if outcome in ("passed", "failed", "skipped"):
            counts[tier][outcome] += 1
    out: dict[str, dict[str, int | str]] = {}
    for tier, c in counts.items():
        status = ("failed" if c["failed"] else
                  "incomplete" if c["skipped"] and tier in NO_SKIP_TIERS else
                  "passed" if c["passed"] else "skipped" if c["skipped"] else "not run")
        out[tier] = {"status": status, **c}
    return out


def reached(summary: dict[str, dict[str, int | str]]) -> list[str]:
    """The passed tiers in :class:`Tier` order; empty unless ``correct`` passed."""
    if summary[Tier.CORRECT.value]["status"] != "passed":
        return []
    return [t.value for t in Tier if summary[t.value]["status"] == "passed"]
