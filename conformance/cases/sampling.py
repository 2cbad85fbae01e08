"""Cases for sampling and the token bitmask."""

from __future__ import annotations

from dataclasses import dataclass

from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels import ops

#: greedy: exact argmax; mixed: greedy and sampled rows; neg_inf: -inf never drawn;
#: top_k/top_p/min_p/combined: draws stay in the filter's support; batch_invariance: a row's
#: token does not depend on the rest of the batch
SAMPLING_KINDS = ("greedy", "mixed", "neg_inf", "top_k", "top_p", "min_p", "combined",
                  "batch_invariance")


@dataclass(frozen=True)
class SamplingCase(Case):
    """Logits are always fp32 (the contract); ``dtype`` is the model dtype of the request."""

    kind: str
    vocab: int = 517


@dataclass(frozen=True)
class BitmaskCase(Case):
    """``batch x vocab`` logits of ``dtype``, a ``words``-wide bitmask, and with ``indexed``
    a bitmask covering only some rows, in shuffled order."""

    batch: int
    vocab: int
    words: int
    indexed: bool


def sampling_cases(ctx: ConformanceContext) -> list[SamplingCase]:
    """Every kind of :data:`SAMPLING_KINDS` per model dtype."""
    dtypes = ALL_DTYPES[:1] if ctx.quick else ALL_DTYPES
    return [SamplingCase(ops.SAMPLING, f"{DTYPE_NAMES[dt]}-{kind}", dt, kind)
            for dt in dtypes for kind in SAMPLING_KINDS]


def bitmask_cases(ctx: ConformanceContext) -> list[BitmaskCase]:
    """Every dtype x vocabularies that are and are not multiples of 32, bitmasks narrower
    than the vocabulary, and indexed (partial, shuffled) bitmasks."""
    grid = [(4, 1000, 32, False), (4, 1000, 30, False), (6, 1024, 32, True)]
    if not ctx.quick:
        grid += [(3, 70, 4, False), (1, 33, 2, True)]
    return [BitmaskCase(ops.TOKEN_BITMASK_APPLY,
                        f"{DTYPE_NAMES[dt]}-B{b}-V{v}-W{w}" + ("-indexed" if ix else ""),
                        dt, b, v, w, ix)
            for dt in ALL_DTYPES for b, v, w, ix in grid]
