"""Statistical conformance of sampling: over many draws (rows of identical logits with steps
``0..N-1``), the token counts must fit the oracle distribution (Pearson chi-square) for
temperature, top-k, top-p and min-p, and a token outside the support (filtered out, or
masked to -inf) must never be drawn."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from heteroserve.conformance.checks import record_error, run_op
from heteroserve.conformance.context import DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.oracles import sampling as oracle
from heteroserve.conformance.params import Case, ConfParam, conformance
from heteroserve.conformance.test_sampling import make_batch
from heteroserve.core.kernels import ops

DRAWS = 4000
VOCAB = 48
#: a correct sampler fails a case with this probability; a wrong distribution scores ~0
P_VALUE_FLOOR = 1e-6
MIN_EXPECTED = 5.0


@dataclass(frozen=True)
class StatsCase(Case):
    """``head``: logits of the leading tokens (the rest sit near -12), ``-inf`` entries are
    masked tokens; the filter parameters apply to every draw."""

    head: tuple[float, ...]
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0


_KINDS: dict[str, dict] = {
    # T=0.6 sharpens: at T=1 the counts would be off by far more than chance allows
    "temperature": dict(head=(2.0, 1.5, 1.0, 0.5, 0.0, -0.5), temperature=0.6),
    "top_k": dict(head=(3.0, 2.6, 2.2, 2.0, 1.8, 1.0), top_k=3),
    # masses ~ .35 .25 .2 .1 .05 .05: p=.75 keeps three (mass before the 4th is .8)
    "top_p": dict(head=tuple(math.log(m) for m in (0.35, 0.25, 0.2, 0.1, 0.05, 0.05)),
                  top_p=0.75),
    # ratios to the best .82 .50 .33 | .20 .08: min_p=.3 keeps four
    "min_p": dict(head=(3.0, 2.8, 2.3, 1.9, 1.4, 0.5), min_p=0.3),
    "masked": dict(head=(2.0, -math.inf, 1.6, -math.inf, 1.1, 0.7, -math.inf, 0.2),
                   temperature=1.3),
}


def stats_cases(ctx: ConformanceContext) -> list[StatsCase]:
    """One case per filter, in the platform's first dtype (logits are fp32 regardless)."""
    dt = ctx.capabilities.dtypes[0]
    return [StatsCase(ops.SAMPLING, f"{DTYPE_NAMES.get(dt, dt)}-chi2-{kind}", dt, **kw)
            for kind, kw in _KINDS.items()]


def _logits(case: StatsCase) -> torch.Tensor:
    gen = case.generator()
    row = torch.randn(VOCAB, generator=gen, dtype=torch.float64).float() - 12.0
    ids = torch.randperm(VOCAB, generator=gen)[: len(case.head)]
    row[ids] = torch.tensor(case.head, dtype=torch.float32)
    return row


def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's test over the cells of ``expected`` (counts, float64), cells expecting fewer
    than :data:`MIN_EXPECTED` pooled into one; returns ``(p-value, degrees of freedom)``."""
    big = expected >= MIN_EXPECTED
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if float(exp[-1]) < MIN_EXPECTED:  # too little pooled mass: fold it into the largest cell
        top = int(torch.argmax(exp[:-1]))
        obs[top] += obs[-1]
        exp[top] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    df = obs.numel() - 1
    if df < 1:
        return 1.0, 0
    stat = float(((obs - exp) ** 2 / exp).sum())
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return p, df


@conformance(stats_cases)
def test_sampling_distribution(conf: ConfParam, ctx: ConformanceContext,
                               request: pytest.FixtureRequest) -> None:
    case: StatsCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    row = _logits(case)
    logits = row.expand(DRAWS, VOCAB).contiguous()
    params = make_batch([case.temperature] * DRAWS, ctx.device, top_ks=[case.top_k] * DRAWS,
                        top_ps=[case.top_p] * DRAWS, min_ps=[case.min_p] * DRAWS)
    ids = run_op(fn, lambda: (logits.to(ctx.device), params), determinism=False).cpu()
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (DRAWS,), \
        f"sampling returns int64 [B], got {ids.dtype} {list(ids.shape)}"
    assert bool(((ids >= 0) & (ids < VOCAB)).all()), "a drawn id is outside the vocabulary"
    want = oracle.distribution(row, case.temperature, case.top_k, case.top_p, case.min_p)
    counts = torch.bincount(ids, minlength=VOCAB).double()
    outside = (want == 0) & (counts > 0)
    assert not bool(outside.any()), \
        f"drew tokens outside the support (filtered or -inf): " \
        f"{ {int(t): int(counts[t]) for t in outside.nonzero().flatten()} }"
    p, df = chi_square_p(counts[want > 0], want[want > 0] * DRAWS)
    request.node.user_properties.append(("chi2_p_value", p))
    record_error(request, 0.0)
    assert p >= P_VALUE_FLOOR, \
        f"{DRAWS} draws do not fit the oracle distribution: chi-square p = {p:.2e} " \
        f"(df {df}) < {P_VALUE_FLOOR:g}; counts {counts[want > 0].int().tolist()}, " \
        f"expected {[round(x, 1) for x in (want[want > 0] * DRAWS).tolist()]}"
