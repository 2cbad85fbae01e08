"""Conformance of the token-bitmask op: exact, in place, masked tokens never win."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance.cases.sampling import BitmaskCase, bitmask_cases
from heteroserve.conformance.checks import assert_bitwise_equal, record_error, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import bitmask as oracle
from heteroserve.conformance.params import ConfParam, conformance


@conformance(bitmask_cases)
def test_token_bitmask_apply(conf: ConfParam, ctx: ConformanceContext,
                             request: pytest.FixtureRequest) -> None:
    case: BitmaskCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    gen = case.generator()
    dev = ctx.device
    logits = randn(gen, case.batch, case.vocab, dtype=case.dtype, device=dev, scale=3.0)
    rows = torch.randperm(case.batch, generator=gen)[: max(1, case.batch // 2)] \
        if case.indexed else torch.arange(case.batch)
    words = torch.randint(-2**31, 2**31, (rows.numel(), case.words), generator=gen,
                          dtype=torch.int64)
    words[:, 0] |= 1  # every row allows token 0, so its argmax is defined
    bitmask = words.to(torch.int32)
    indices = rows.to(torch.int32).to(dev) if case.indexed else None
    bitmask_dev = bitmask.to(dev)

    def apply(lg: torch.Tensor) -> torch.Tensor:
        result = fn(lg, bitmask_dev, indices)
        assert result is None or result is lg or result.data_ptr() == lg.data_ptr(), \
            "token_bitmask_apply works in place"
        return lg

    out = run_op(apply, lambda: (logits.clone(),))
    ref = oracle.apply(logits, bitmask, rows.to(torch.int32) if case.indexed else None)
    assert_bitwise_equal(out, ref.to(case.dtype), "masked logits (allowed unchanged, others -inf)")
    record_error(request, 0.0)
    allowed = oracle.allowed(bitmask, case.vocab)
    best = out.cpu().float()[rows].argmax(dim=-1)
    assert bool(allowed[torch.arange(rows.numel()), best].all()), "a masked token is the argmax"
