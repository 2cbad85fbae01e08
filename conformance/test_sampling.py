"""Conformance of sampling: greedy is exact, -inf tokens are never drawn, draws stay inside
the top-k / top-p / min-p support, and a row's draw depends only on its own logits,
parameters, seed and step (not on the batch around it)."""

from __future__ import annotations

import math

import pytest
import torch

from heteroserve.conformance.cases.sampling import SamplingCase, sampling_cases
from heteroserve.conformance.checks import assert_bitwise_equal, record_error, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles import sampling as oracle
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.kernels.ops import SamplingBatch

DRAWS = 32  # rows of identical logits with steps 0..31: 32 draws in one call


def make_batch(temps: list[float], device: torch.device, top_ks: list[int] | None = None,
               top_ps: list[float] | None = None, min_ps: list[float] | None = None,
               seeds: list[int] | None = None, steps: list[int] | None = None) -> SamplingBatch:
    """A :class:`SamplingBatch` on ``device``; unspecified filters are off, seeds 1234 and
    steps ``0..B-1``."""
    b = len(temps)

    def t(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return SamplingBatch(
        temperatures=t(temps, torch.float32), top_ks=t(top_ks or [0] * b, torch.int32),
        top_ps=t(top_ps or [1.0] * b, torch.float32), min_ps=t(min_ps or [0.0] * b, torch.float32),
        seeds=t(seeds or [1234] * b, torch.int64), steps=t(steps or list(range(b)), torch.int64),
        all_greedy=all(x == 0.0 for x in temps))


def _params_row(p: SamplingBatch, i: int) -> tuple[float, int, float, float]:
    return (float(p.temperatures[i]), int(p.top_ks[i]), float(p.top_ps[i]), float(p.min_ps[i]))


def _sample(fn, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    out = run_op(fn, lambda: (logits.clone(), params))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64, \
        f"sampling returns int64 ids, got {getattr(out, 'dtype', type(out).__name__)}"
    assert tuple(out.shape) == (logits.shape[0],), f"sampling returns [B], got {list(out.shape)}"
    return out.cpu()


def _check_support(ids: torch.Tensor, logits: torch.Tensor, params: SamplingBatch) -> None:
    greedy = oracle.greedy(logits)
    for i, token in enumerate(ids.tolist()):
        temp, k, p, m = _params_row(params, i)
        assert 0 <= token < logits.shape[1], f"row {i}: token {token} outside the vocabulary"
        if temp == 0.0:
            assert token == int(greedy[i]), \
                f"row {i}: greedy gave {token}, the argmax is {int(greedy[i])}"
            continue
        assert math.isfinite(float(logits[i, token])), \
            f"row {i}: drew token {token}, whose logit is -inf"
        keep = oracle.support(logits[i], temp, k, p, m)
        assert bool(keep[token]), f"row {i}: token {token} is outside the support " \
            f"(T={temp}, top_k={k}, top_p={p:g}, min_p={m:g}: {keep.nonzero().flatten().tolist()})"


def _peaked(gen: torch.Generator, vocab: int, head: list[float]) -> torch.Tensor:
    """fp32 ``[vocab]`` logits: ``head`` at random token ids, the rest far below."""
    logits = torch.randn(vocab, generator=gen) - 12.0
    ids = torch.randperm(vocab, generator=gen)[: len(head)]
    logits[ids] = torch.tensor(head)
    return logits


def _inputs(case: SamplingCase, dev: torch.device) -> tuple[torch.Tensor, SamplingBatch, bool]:
    """``(logits [B, V] fp32 host, params, expect more than one distinct token)``."""
    gen, v = case.generator(), case.vocab
    if case.kind == "greedy":
        logits = torch.randn(6, v, generator=gen) * 3
        logits[1, [10, 400]] = logits[1].max() + 1.0  # a tie: the lower id wins
        return logits, make_batch([0.0] * 6, dev), False
    if case.kind == "mixed":
        logits = torch.randn(8, v, generator=gen) * 3
        return logits, make_batch([0.0, 1.0] * 4, dev, top_ks=[0, 5] * 4), False
    if case.kind == "neg_inf":
        row = torch.full((v,), -math.inf)
        row[torch.randperm(v, generator=gen)[:7]] = torch.randn(7, generator=gen) - 100.0
        logits = row.expand(DRAWS, v).clone()
        temps = [1.5] * (DRAWS // 2) + [0.7] * (DRAWS // 2)
        return logits, make_batch(temps, dev, top_ps=[1.0, 0.9] * (DRAWS // 2)), True
    if case.kind == "top_k":  # four near-equal tokens above the rest
        row = _peaked(gen, v, [5.0, 5.1, 4.9, 5.05, 2.0, 1.5])
        return row.expand(DRAWS, v).clone(), make_batch(
            [1.0] * DRAWS, dev, top_ks=[4] * DRAWS), True
    if case.kind == "top_p":  # masses .3 .25 .2 .1 ...: p=.7 keeps three, p=.5 keeps two
        head = [math.log(x) for x in (0.3, 0.25, 0.2, 0.1, 0.05, 0.04)]
        row = _peaked(gen, v, head)
        return row.expand(DRAWS, v).clone(), make_batch(
            [1.0] * DRAWS, dev, top_ps=[0.7, 0.5] * (DRAWS // 2)), True
    if case.kind == "min_p":  # gaps to the best: 0.2, 0.7, 1.0 kept at min_p .3; 1.6, 2.5 not
        row = _peaked(gen, v, [3.0, 2.8, 2.3, 2.0, 1.4, 0.5])
        return row.expand(DRAWS, v).clone(), make_batch(
            [1.0] * DRAWS, dev, min_ps=[0.3] * DRAWS), True
    if case.kind == "combined":
        row = _peaked(gen, v, [4.0, 3.9, 3.7, 3.2, 3.0, 2.2, 2.0, 1.0, 0.5, 0.1])
        return row.expand(DRAWS, v).clone(), make_batch(
            [0.8] * DRAWS, dev, top_ks=[8] * DRAWS, top_ps=[0.8] * DRAWS,
            min_ps=[0.05] * DRAWS), True
    if case.kind == "batch_invariance":
        logits = torch.randn(8, v, generator=gen) * 2
        return logits, make_batch(
            [0.0, 1.0, 0.7, 1.3, 1.0, 1.0, 0.9, 2.0], dev,
            top_ks=[0, 0, 20, 0, 0, 50, 10, 0], top_ps=[1.0, 1.0, 1.0, 0.9, 1.0, 0.95, 0.8, 1.0],
            min_ps=[0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.05, 0.0],
            seeds=[11, 12, 13, 14, 15, 16, 17, 18], steps=[3, 0, 7, 1, 9, 2, 5, 4]), False
    raise ValueError(f"unknown sampling case kind {case.kind!r}")


def _subset(params: SamplingBatch, rows: list[int]) -> SamplingBatch:
    idx = torch.tensor(rows, device=params.temperatures.device)
    return SamplingBatch(*(getattr(params, f).index_select(0, idx) for f in (
        "temperatures", "top_ks", "top_ps", "min_ps", "seeds", "steps")),
        all_greedy=all(float(params.temperatures[r]) == 0.0 for r in rows))


@conformance(sampling_cases)
def test_sampling(conf: ConfParam, ctx: ConformanceContext,
                  request: pytest.FixtureRequest) -> None:
    case: SamplingCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    logits, params, varied = _inputs(case, ctx.device)
    ids = _sample(fn, logits.to(ctx.device), params)
    _check_support(ids, logits, params)
    record_error(request, 0.0)
    if varied:
        assert len(set(ids.tolist())) > 1, f"{DRAWS} draws over steps 0..{DRAWS - 1} all gave " \
            f"token {int(ids[0])}: the draw ignores the step"
    if case.kind == "batch_invariance":
        n = logits.shape[0]
        for rows in ([*range(n)][::-1], [2, 5], [6]):
            sub = _sample(fn, logits[rows].to(ctx.device), _subset(params, rows))
            assert_bitwise_equal(sub, ids[rows], f"tokens of rows {rows} sampled in another batch")
