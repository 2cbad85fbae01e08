"""Input contracts of the per-token ops (tier ``correct``).

- Non-contiguous inputs (row-strided views, as a fused QKV or gate-up split produces): an
  implementation either computes the right answer or raises; it never returns garbage.
- Inputs the contract rules out (a weight of the wrong width, an odd gate-up width, a
  residual of another shape, a second norm weight of the wrong width) must raise, before or
  instead of returning anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from heteroserve.conformance.checks import assert_close
from heteroserve.conformance.context import DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import activation as act_oracle
from heteroserve.conformance.oracles import norm as norm_oracle
from heteroserve.conformance.params import Case, ConfParam, conformance
from heteroserve.core.kernels import ops

EPS = 1e-6
TOKENS, HIDDEN, PAD = 5, 256, 64


@dataclass(frozen=True)
class ContractCase(Case):
    """``kind``: ``noncontiguous`` (must be right or raise) or ``refused`` (must raise)."""

    kind: str


def contract_cases(ctx: ConformanceContext) -> list[ContractCase]:
    """Both kinds for each per-token op, in the platform's first dtype."""
    dt = ctx.capabilities.dtypes[0]
    return [ContractCase(op, f"{DTYPE_NAMES.get(dt, dt)}-{kind}", dt, kind)
            for op in (ops.RMS_NORM, ops.FUSED_ADD_RMS_NORM, ops.NORM_ADD_NORM, ops.SILU_AND_MUL,
                       ops.GELU_AND_MUL)
            for kind in ("noncontiguous", "refused")]


def _strided(gen: torch.Generator, cols: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A ``[TOKENS, cols]`` view whose rows are ``cols + PAD`` apart."""
    wide = randn(gen, TOKENS, cols + PAD, dtype=dtype, device=device)
    view = wide[:, :cols]
    assert not view.is_contiguous()
    return view


def _case_call(op: str, kind: str, gen: torch.Generator, dt: torch.dtype, dev: torch.device
               ) -> tuple[tuple, Callable[[object], list[tuple[torch.Tensor, torch.Tensor]]]]:
    """``(args, pairs)``: the call's arguments and, for ``noncontiguous``, a function from
    the output to ``(output tensor, oracle)`` pairs."""
    weight = randn(gen, HIDDEN + (kind == "refused"), dtype=dt, device=dev, scale=0.2, shift=1.0)
    if op == ops.RMS_NORM:
        x = _strided(gen, HIDDEN, dt, dev)
        return (x, weight, EPS), lambda out: [(out, norm_oracle.rms_norm(x, weight, EPS))]
    if op == ops.FUSED_ADD_RMS_NORM:
        x = _strided(gen, HIDDEN, dt, dev)
        res = randn(gen, TOKENS, HIDDEN + (kind == "refused"), dtype=dt, device=dev)
        weight = weight[:HIDDEN]
        ref_out, ref_res = norm_oracle.fused_add_rms_norm(x, res, weight, EPS) \
            if kind != "refused" else (None, None)
        return (x.clone(), res.clone(), weight, EPS), \
            lambda out: [(out[0], ref_out), (out[1], ref_res)]
    if op == ops.NORM_ADD_NORM:  # refused: the second weight is one too wide
        x = _strided(gen, HIDDEN, dt, dev)
        res = randn(gen, TOKENS, HIDDEN, dtype=dt, device=dev)
        weight, next_weight = weight[:HIDDEN], weight.flip(0)
        ref_out, ref_res = norm_oracle.norm_add_norm(x, res, weight, next_weight, EPS, dt) \
            if kind != "refused" else (None, None)
        return (x, res, weight, next_weight, EPS), \
            lambda out: [(out[0], ref_out), (out[1], ref_res)]  # refs taken before the call
    x = _strided(gen, 2 * HIDDEN + (kind == "refused"), dt, dev)
    if op == ops.SILU_AND_MUL:
        return (x,), lambda out: [(out, act_oracle.silu_and_mul(x))]
    return (x, "none"), lambda out: [(out, act_oracle.gelu_and_mul(x, "none"))]


@conformance(contract_cases)
def test_input_contract(conf: ConfParam, ctx: ConformanceContext,
                        request: pytest.FixtureRequest) -> None:
    case: ContractCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    args, pairs = _case_call(case.op, case.kind, case.generator(), case.dtype, ctx.device)
    if case.kind == "refused":
        try:
            out = fn(*args)
            ctx.platform.synchronize(ctx.device)
        except Exception:
            return
        pytest.fail(f"{conf.impl} accepted inputs its contract rules out (a mismatched width) "
                    f"and returned {type(out).__name__}", pytrace=False)
    try:
        out = fn(*args)
        ctx.platform.synchronize(ctx.device)
    except Exception as exc:  # refusing a strided input is allowed; garbage is not
        request.node.user_properties.append(("refused_noncontiguous", repr(exc)[:200]))
        return
    for i, (got, ref) in enumerate(pairs(out)):
        assert_close(got, ref, case.dtype, f"{case.op} on a row-strided input (output {i})",
                     request)
