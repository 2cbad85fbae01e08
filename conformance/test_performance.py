"""The optional ``performance`` tier: memory-bound ops at a stated fraction of the device's
measured copy bandwidth.

Runs only with ``--conformance-performance FRACTION``; otherwise its tests have no cases (the
tier is ``not run``, and the default run, a CPU run in CI included, is unaffected). Each op
is timed on one large input in the platform's preferred dtype (bf16 when declared) and its
effective bandwidth (bytes read + written per second, :mod:`heteroserve.conformance.
performance`) must reach ``FRACTION`` of the copy bandwidth measured the same way. The
report states both numbers per op.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.conformance.performance import PerfCase, check_bandwidth, perf_cases
from heteroserve.core.kernels import ops


def _cases(op: str) -> Callable[[ConformanceContext], list[PerfCase]]:
    return lambda ctx: perf_cases(ctx, op)


def _plane(case: PerfCase, ctx: ConformanceContext, salt: int) -> torch.Tensor:
    return randn(case.generator(salt), case.tokens, case.width, dtype=case.dtype,
                 device=ctx.device)


@conformance(_cases(ops.RMS_NORM))
def test_rms_norm_bandwidth(conf: ConfParam, ctx: ConformanceContext,
                            request: pytest.FixtureRequest) -> None:
    case: PerfCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x = _plane(case, ctx, 0)
    weight = torch.ones(case.width, dtype=case.dtype, device=ctx.device)
    check_bandwidth(conf, ctx, request.node.user_properties, lambda: fn(x, weight, 1e-6))


@conformance(_cases(ops.FUSED_ADD_RMS_NORM))
def test_fused_add_rms_norm_bandwidth(conf: ConfParam, ctx: ConformanceContext,
                                      request: pytest.FixtureRequest) -> None:
    case: PerfCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x, residual = _plane(case, ctx, 0), _plane(case, ctx, 1)
    weight = torch.ones(case.width, dtype=case.dtype, device=ctx.device)
    check_bandwidth(conf, ctx, request.node.user_properties, lambda: fn(x, residual, weight, 1e-6))


@conformance(_cases(ops.SILU_AND_MUL))
def test_silu_and_mul_bandwidth(conf: ConfParam, ctx: ConformanceContext,
                                request: pytest.FixtureRequest) -> None:
    case: PerfCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x = _plane(case, ctx, 0)
    check_bandwidth(conf, ctx, request.node.user_properties, lambda: fn(x))


@conformance(_cases(ops.GELU_AND_MUL))
def test_gelu_and_mul_bandwidth(conf: ConfParam, ctx: ConformanceContext,
                                request: pytest.FixtureRequest) -> None:
    case: PerfCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    x = _plane(case, ctx, 0)
    check_bandwidth(conf, ctx, request.node.user_properties, lambda: fn(x))
