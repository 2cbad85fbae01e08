"""Conformance of the optional fused entry points of linear methods,
``apply_rms_norm`` (RMSNorm, optionally after a residual add, then the projection),
``apply_silu_and_mul`` (SiLU-and-mul then the projection), ``apply_gated`` (the
projection, then a gated activation of its two output halves) and ``apply_upcast`` (bf16 or
fp16 rows into an fp32 unquantized layer), against float64 oracles.

They run on the schemes whose activations go in unquantized, and ``apply_silu_and_mul`` also
on ``fp8_block``, whose dynamic per-group activation quantization the oracle reproduces from
the activated rows rounded to the dtype (as the SiLU-and-mul op rounds them); a method that
returns None for a case (no fused kernel for that input, the contract's default) is reported
as skipped with that reason.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from heteroserve.conformance.cases.linear import LinearCase, linear_cases
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.linear_setup import load_layer
from heteroserve.conformance.oracles import activation as act_oracle
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.conformance.oracles import norm as norm_oracle
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.kernels.linear import GATED_ACTIVATIONS

_UNQUANTIZED_ACTIVATIONS = ("unquantized", "awq_w4a16", "gptq_w4a16")
EPS = 1e-6


def fused_cases(ctx: ConformanceContext) -> list[LinearCase]:
    """The linear cases of the schemes with unquantized activations, named
    ``<scheme>-<case>`` (all schemes share one report row per entry point)."""
    return [replace(c, name=f"{c.scheme}-{c.name}") for c in linear_cases(ctx)
            if c.scheme in _UNQUANTIZED_ACTIVATIONS]


def _rows(gen: torch.Generator, t: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(t, k, generator=gen, dtype=torch.float64).to(dtype)


def _bias(case: LinearCase, gen: torch.Generator) -> torch.Tensor | None:
    if not case.bias:
        return None
    return torch.randn(case.out_features, generator=gen, dtype=torch.float64).to(case.dtype)


def _skip_if_none(out: object, entry: str, case: LinearCase) -> None:
    if out is None:
        pytest.skip(f"{entry} returns None for {case.tokens} row(s): no fused kernel for "
                    "this input, the caller runs the ops separately")


@conformance(fused_cases, label="linear_rms_norm")
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_linear_rms_norm(conf: ConfParam, ctx: ConformanceContext, with_residual: bool,
                         request: pytest.FixtureRequest) -> None:
    case: LinearCase = conf.case  # type: ignore[assignment]
    method = conf.load()()
    layer, ckpt, _, gen = load_layer(case, method, ctx)
    dt, dev, k = case.dtype, ctx.device, case.in_features
    x, residual = _rows(gen, case.tokens, k, dt), _rows(gen, case.tokens, k, dt)
    norm_weight = (torch.randn(k, generator=gen, dtype=torch.float64) * 0.2 + 1.0).to(dt)
    bias = _bias(case, gen)
    x_dev, r_dev = x.to(dev), residual.to(dev)
    r_arg = r_dev if with_residual else None
    args = (layer, x_dev, r_arg, norm_weight.to(dev), EPS,
            bias.to(dev) if bias is not None else None)
    _skip_if_none(method.apply_rms_norm(*args), "apply_rms_norm", case)
    out = run_op(lambda: method.apply_rms_norm(*args), tuple)
    assert isinstance(out, tuple) and len(out) == 2, "apply_rms_norm returns (y, h)"
    assert_bitwise_equal((x_dev, r_dev), (x, residual), "apply_rms_norm must not modify inputs")
    h_ref = (x.float() + residual.float()).to(dt) if with_residual else x
    assert_bitwise_equal(out[1].cpu(), h_ref, "h = x + residual rounded to the dtype")
    normed = norm_oracle.rms_norm(h_ref, norm_weight, EPS)
    ref = oracle.linear(case.scheme, normed, ckpt, case.group_size, bias, None)
    assert_close(out[0], ref, dt, f"linear_rms_norm.{case.scheme}", request)


def silu_and_mul_cases(ctx: ConformanceContext) -> list[LinearCase]:
    """:func:`fused_cases` and the ``fp8_block`` cases (named alike)."""
    return fused_cases(ctx) + [replace(c, name=f"{c.scheme}-{c.name}")
                               for c in linear_cases(ctx) if c.scheme == "fp8_block"]


@conformance(silu_and_mul_cases, label="linear_silu_and_mul")
def test_linear_silu_and_mul(conf: ConfParam, ctx: ConformanceContext,
                             request: pytest.FixtureRequest) -> None:
    case: LinearCase = conf.case  # type: ignore[assignment]
    method = conf.load()()
    layer, ckpt, act_fp8, gen = load_layer(case, method, ctx)
    dt, dev, k = case.dtype, ctx.device, case.in_features
    x = _rows(gen, case.tokens, 2 * k, dt)
    bias = _bias(case, gen)
    x_dev = x.to(dev)
    args = (layer, x_dev, bias.to(dev) if bias is not None else None)
    _skip_if_none(method.apply_silu_and_mul(*args), "apply_silu_and_mul", case)
    out = run_op(lambda: method.apply_silu_and_mul(*args), tuple)
    assert_bitwise_equal(x_dev, x, "apply_silu_and_mul must not modify x")
    gate, up = x.double()[:, :k], x.double()[:, k:]
    activated = torch.nn.functional.silu(gate) * up
    if case.scheme == "fp8_block":  # quantized from the op's rounded output
        activated = activated.to(dt).double()
    ref = oracle.linear(case.scheme, activated, ckpt, case.group_size, bias, act_fp8)
    assert_close(out, ref, dt, f"linear_silu_and_mul.{case.scheme}", request)


@conformance(fused_cases, label="linear_gated")
@pytest.mark.parametrize("activation", GATED_ACTIVATIONS)
def test_linear_gated(conf: ConfParam, ctx: ConformanceContext, activation: str,
                      request: pytest.FixtureRequest) -> None:
    case: LinearCase = conf.case  # type: ignore[assignment]
    if case.out_features % 2:
        pytest.skip(f"{case.out_features} outputs do not split into [gate | up]")
    method = conf.load()()
    layer, ckpt, _, gen = load_layer(case, method, ctx)
    dt, dev = case.dtype, ctx.device
    x = _rows(gen, case.tokens, case.in_features, dt)
    bias = _bias(case, gen)
    x_dev = x.to(dev)
    args = (layer, x_dev, activation, bias.to(dev) if bias is not None else None)
    _skip_if_none(method.apply_gated(*args), "apply_gated", case)
    out = run_op(lambda: method.apply_gated(*args), tuple)
    assert_bitwise_equal(x_dev, x, "apply_gated must not modify x")
    assert out.shape == (case.tokens, case.out_features // 2), "act(gate) * up: [T, N / 2]"
    lin = oracle.linear(case.scheme, x, ckpt, case.group_size, bias, None)
    assert_close(out, act_oracle.gated(lin, activation), dt, f"linear_gated.{case.scheme}",
                 request)


def upcast_cases(ctx: ConformanceContext) -> list[LinearCase]:
    """The fp32 unquantized linear cases (``apply_upcast`` widens into an fp32 layer)."""
    return [c for c in fused_cases(ctx) if c.scheme == "unquantized" and c.dtype == torch.float32]


@conformance(upcast_cases, label="linear_upcast")
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_upcast(conf: ConfParam, ctx: ConformanceContext, x_dtype: torch.dtype,
                       request: pytest.FixtureRequest) -> None:
    case: LinearCase = conf.case  # type: ignore[assignment]
    method = conf.load()()
    layer, ckpt, _, gen = load_layer(case, method, ctx)
    x = _rows(gen, case.tokens, case.in_features, x_dtype)
    bias = _bias(case, gen)
    x_dev = x.to(ctx.device)
    args = (layer, x_dev, bias.to(ctx.device) if bias is not None else None)
    _skip_if_none(method.apply_upcast(*args), "apply_upcast", case)
    out = run_op(lambda: method.apply_upcast(*args), tuple)
    assert_bitwise_equal(x_dev, x, "apply_upcast must not modify x")
    assert out.dtype == torch.float32, f"apply_upcast returns the layer's fp32, got {out.dtype}"
    ref = oracle.linear(case.scheme, x.to(torch.float32), ckpt, case.group_size, bias, None)
    assert_close(out, ref, torch.float32, "linear_upcast.unquantized", request)
