"""Conformance of every linear method: checkpoint tensors from the suite's own quantizers,
``create_weights`` / ``process_weights_after_loading`` / ``apply`` against the dequantized
float64 oracle (with the dynamic activation quantization of W8A8 schemes). A scheme a plugin
adds is run against its own definition (``LinearSchemeSpec.quantize`` / ``dequantize``)."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance import quantize
from heteroserve.conformance.cases.linear import LinearCase, linear_cases
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.linear_setup import load_layer, reference
from heteroserve.conformance.params import ConfParam, conformance


@conformance(linear_cases)
def test_linear(conf: ConfParam, ctx: ConformanceContext,
                request: pytest.FixtureRequest) -> None:
    case: LinearCase = conf.case  # type: ignore[assignment]
    method = conf.load()()
    dt = case.dtype
    layer, ckpt, act_fp8, gen = load_layer(case, method, ctx)
    bias = (torch.randn(case.out_features, generator=gen, dtype=torch.float64)
            .to(dt)) if case.bias else None
    if case.scheme in ("fp8_per_tensor", "fp8_per_channel", "fp8_block", "int8_w8a8"):
        x = quantize.w8a8_activations(gen, case.tokens, case.in_features, case.scheme, dt,
                                      act_fp8)
    else:
        x = torch.randn(case.tokens, case.in_features, generator=gen,
                        dtype=torch.float64).to(dt)
    dev = ctx.device
    x_dev, bias_dev = x.to(dev), bias.to(dev) if bias is not None else None
    out = run_op(lambda: method.apply(layer, x_dev, bias_dev), tuple)
    assert_bitwise_equal(x_dev, x, "apply must not modify x")
    ref = reference(case, ctx, x, ckpt, bias, act_fp8)
    assert_close(out, ref, dt, f"linear.{case.scheme}", request)
