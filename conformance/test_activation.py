"""Conformance of the gated activations (SiLU-and-mul, GELU-and-mul)."""

from __future__ import annotations

import pytest

from heteroserve.conformance.cases.elementwise import (
    ActCase, gelu_and_mul_cases, silu_and_mul_cases,
)
from heteroserve.conformance.checks import assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import activation as oracle
from heteroserve.conformance.params import ConfParam, conformance


def _x(case: ActCase, ctx: ConformanceContext):
    return randn(case.generator(), case.tokens, 2 * case.intermediate, dtype=case.dtype,
                 device=ctx.device, scale=2.0)


@conformance(silu_and_mul_cases)
def test_silu_and_mul(conf: ConfParam, ctx: ConformanceContext,
                      request: pytest.FixtureRequest) -> None:
    case: ActCase = conf.case  # type: ignore[assignment]
    fn, x = conf.load(), _x(case, ctx)
    out = run_op(fn, lambda: (x,))
    assert_close(out, oracle.silu_and_mul(x), case.dtype, "silu_and_mul", request)


@conformance(gelu_and_mul_cases)
def test_gelu_and_mul(conf: ConfParam, ctx: ConformanceContext,
                      request: pytest.FixtureRequest) -> None:
    case: ActCase = conf.case  # type: ignore[assignment]
    fn, x = conf.load(), _x(case, ctx)
    out = run_op(fn, lambda: (x, case.approximate))
    assert_close(out, oracle.gelu_and_mul(x, case.approximate), case.dtype,
                 f"gelu_and_mul({case.approximate})", request)
