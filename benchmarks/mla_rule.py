"""Decode paths of the Triton MLA backend (``platforms/triton/mla.py``), for side-by-side
runs: ``python3 benchmarks/mla_rule.py RULE --out X.json [--workloads ...]`` runs the headline
workloads (``bench_headline.py``) with ``RULE`` installed; the JSON records it as
``mla_rule``.

Rules:

- ``default``: as it stands (since 2026-12-06: up to ``FUSED_MAX_BATCH`` sequences take the
  Triton absorb kernels of ``mla_absorb.py``, the latent write folded into the first).
- ``bmm``: every batch takes the path before: the latent write kernel, a cuBLAS BMM for the
  absorbed query, the split kernel, the merge and a second BMM for the output (the split and
  merge kernels launch with PDL under both rules).
"""

from __future__ import annotations

import sys
from pathlib import Path

from heteroserve.platforms.triton.mla import TritonMLA

RULES: dict[str, int] = {"default": TritonMLA.fused_max_batch, "bmm": 0}


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    if rule not in RULES:
        raise SystemExit(f"mla_rule: unknown rule {rule!r} (known: {', '.join(RULES)})")
    TritonMLA.fused_max_batch = RULES[rule]


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_headline

    apply(sys.argv[1])
    return bench_headline.main_tagged(sys.argv[2:], {"mla_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
