"""Conformance of RMSNorm, fused add + RMSNorm and RMSNorm / add / RMSNorm against the
float64 oracles."""

from __future__ import annotations

import pytest

from heteroserve.conformance.cases.elementwise import (
    NormCase, fused_add_rms_norm_cases, norm_add_norm_cases, rms_norm_cases,
)
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import norm as oracle
from heteroserve.conformance.params import ConfParam, conformance


def _inputs(case: NormCase, ctx: ConformanceContext):
    gen = case.generator()
    x = randn(gen, case.tokens, case.hidden, dtype=case.dtype, device=ctx.device,
              scale=case.amplitude)
    residual = randn(gen, case.tokens, case.hidden, dtype=case.dtype, device=ctx.device,
                     scale=case.amplitude)
    weight = randn(gen, case.hidden, dtype=case.dtype, device=ctx.device, scale=0.2, shift=1.0)
    return x, residual, weight


@conformance(rms_norm_cases)
def test_rms_norm(conf: ConfParam, ctx: ConformanceContext,
                  request: pytest.FixtureRequest) -> None:
    case: NormCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x, _, weight = _inputs(case, ctx)
    x_before = x.clone()
    out = run_op(fn, lambda: (x, weight, case.eps))
    assert_bitwise_equal(x, x_before, "rms_norm must not modify x")
    assert_close(out, oracle.rms_norm(x, weight, case.eps), case.dtype, "rms_norm", request)


@conformance(fused_add_rms_norm_cases)
def test_fused_add_rms_norm(conf: ConfParam, ctx: ConformanceContext,
                            request: pytest.FixtureRequest) -> None:
    case: NormCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x, residual, weight = _inputs(case, ctx)
    out = run_op(fn, lambda: (x.clone(), residual.clone(), weight, case.eps))
    assert isinstance(out, tuple) and len(out) == 2, "fused_add_rms_norm returns (out, residual)"
    ref_out, ref_res = oracle.fused_add_rms_norm(x, residual, weight, case.eps)
    assert_close(out[1], ref_res, case.dtype, "fused_add_rms_norm residual", request)
    assert_close(out[0], ref_out, case.dtype, "fused_add_rms_norm output", request)


@conformance(norm_add_norm_cases)
def test_norm_add_norm(conf: ConfParam, ctx: ConformanceContext,
                       request: pytest.FixtureRequest) -> None:
    case: NormCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x, residual, weight = _inputs(case, ctx)
    next_weight = randn(case.generator(1), case.hidden, dtype=case.dtype, device=ctx.device,
                        scale=0.2, shift=1.0)
    out = run_op(fn, lambda: (x.clone(), residual.clone(), weight, next_weight, case.eps))
    assert isinstance(out, tuple) and len(out) == 2, "norm_add_norm returns (out, residual)"
    ref_out, ref_res = oracle.norm_add_norm(x, residual, weight, next_weight, case.eps,
                                            case.dtype)
    assert out[0].dtype == out[1].dtype == case.dtype, "norm_add_norm keeps the input dtype"
    assert_close(out[1], ref_res, case.dtype, "norm_add_norm residual", request)
    assert_close(out[0], ref_out, case.dtype, "norm_add_norm output", request)
