"""The decoder's qk-norm / rotary at decode, for side-by-side runs: ``python3
benchmarks/prologue_rule.py RULE --out X.json [--workloads ...]`` runs the headline
workloads (``bench_headline.py``) with ``RULE`` installed; the JSON records it as
``prologue_rule``.

Rules:

- ``default``: as it stands: the Triton decode split kernel norms and rotates q and the new
  key itself (``TritonAttention.forward_prologue``, plugin API 1.9).
- ``prologue_off``: the qk-norm + rotary (Qwen3, Gemma 3) or rotary (Llama) kernel launched
  before attention, the path before plugin API 1.9.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from heteroserve.platforms.triton.attention import TritonAttention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import rule_named  # noqa: E402


def _prologue_off() -> None:
    TritonAttention.forward_prologue = lambda self, *args: None  # type: ignore[method-assign]


RULES: dict[str, Callable[[], None]] = {"default": lambda: None,
                                        "prologue_off": _prologue_off}


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    rule_named("prologue_rule", RULES, rule)()


def main() -> int:
    import bench_headline

    apply(sys.argv[1])
    return bench_headline.main_tagged(sys.argv[2:], {"prologue_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
