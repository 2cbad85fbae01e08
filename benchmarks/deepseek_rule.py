"""DeepSeek decode paths, for side-by-side runs: ``python3 benchmarks/deepseek_rule.py RULE
--out X.json [--workloads ...]`` runs the headline workloads (``bench_headline.py``) with
``RULE`` installed; the JSON records it as ``deepseek_rule``.

Rules (each names what it puts back; everything else as the default):

- ``default``: as it stands.
- ``bmm``: the MLA decode of every batch takes the path before commit d6b2234: the latent
  write kernel, a cuBLAS BMM for the absorbed query, the split kernel, the merge and a second
  BMM for the output (the Triton absorb kernels of ``mla_absorb.py`` serve up to
  ``FUSED_MAX_BATCH`` sequences by default; the split and merge kernels keep PDL, which
  they gained in the same commit).
- ``routing_before``: the MoE routing before commit 65a56e7: the router's input cast
  to fp32 by a separate torch kernel (not read as bf16 by the GEMV,
  ``LinearMethod.apply_upcast``) and the shared-expert slots appended by two ``torch.cat``
  (not one, as halves of one tensor).
- ``slots_concat``: the shared-expert slots appended by the one concatenation after the
  routing op (the path before plugin API 1.7, where the op writes them itself).
- ``prologue_off``: the latent RMSNorm and the rotary embedding as their own launches before
  the MLA decode (the path before plugin API 1.8, where the absorbed-query kernel folds them).
- ``before_18``: both of the above (the decode path of plugin API 1.6).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from heteroserve.core.layers.linear import ReplicatedLinear
from heteroserve.core.models.deepseek import DeepseekMoE
from heteroserve.platforms.triton.mla import TritonMLA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import rule_named  # noqa: E402


def _bmm() -> None:
    TritonMLA.fused_max_batch = 0


def _slots_concat() -> None:
    DeepseekMoE.slots_in_op = lambda self: False  # type: ignore[method-assign]


def _prologue_off() -> None:
    TritonMLA.forward_prologue = lambda self, *args: None  # type: ignore[method-assign]


def _before_18() -> None:
    _slots_concat()
    _prologue_off()


def _routing_before() -> None:
    def cast_then_apply(self: ReplicatedLinear, x: torch.Tensor) -> torch.Tensor:
        return self(x.to(self.ctx.dtype))

    def two_cats(self: DeepseekMoE, weights: torch.Tensor, ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        t, n = ids.shape[0], self.shared_ids.shape[0]
        return (torch.cat([weights, self.shared_weights.expand(t, n)], dim=1),
                torch.cat([ids, self.shared_ids.expand(t, n)], dim=1))

    ReplicatedLinear.forward_upcast = cast_then_apply  # type: ignore[method-assign]
    DeepseekMoE._append_shared = two_cats  # type: ignore[method-assign]
    _slots_concat()


RULES: dict[str, Callable[[], None]] = {"default": lambda: None, "bmm": _bmm,
                                        "routing_before": _routing_before,
                                        "slots_concat": _slots_concat,
                                        "prologue_off": _prologue_off,
                                        "before_18": _before_18}


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    rule_named("deepseek_rule", RULES, rule)()


def main() -> int:
    import bench_headline

    apply(sys.argv[1])
    return bench_headline.main_tagged(sys.argv[2:], {"deepseek_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
