"""Conformance of rotary position embedding (neox, GPT-J, partial rotary dims)."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance.cases.elementwise import RotaryCase, rotary_cases
from heteroserve.conformance.checks import assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import rotary as oracle
from heteroserve.conformance.params import ConfParam, conformance


@conformance(rotary_cases)
def test_rotary_embedding(conf: ConfParam, ctx: ConformanceContext,
                          request: pytest.FixtureRequest) -> None:
    case: RotaryCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    gen = case.generator()
    dev = ctx.device
    positions = torch.randint(0, case.max_position, (case.tokens,), generator=gen)
    positions[0] = 0
    q = randn(gen, case.tokens, case.q_heads, case.head_size, dtype=case.dtype, device=dev)
    k = randn(gen, case.tokens, case.kv_heads, case.head_size, dtype=case.dtype, device=dev)
    cache = oracle.cos_sin_cache(case.max_position, case.rotary_dim).to(torch.float32)
    pos_dev, cache_dev = positions.to(dev), cache.to(dev)
    out = run_op(fn, lambda: (pos_dev, q.clone(), k.clone(), cache_dev, case.is_neox))
    assert isinstance(out, tuple) and len(out) == 2, "rotary returns (q, k)"
    assert_close(out[0], oracle.rotate(positions, q, cache, case.is_neox), case.dtype,
                 "rotary q", request)
    assert_close(out[1], oracle.rotate(positions, k, cache, case.is_neox), case.dtype,
                 "rotary k", request)
