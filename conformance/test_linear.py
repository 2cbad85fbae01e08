"""Conformance of every linear method: checkpoint tensors from the suite's own quantizers,
``create_weights`` / ``process_weights_after_loading`` / ``apply`` against the dequantized
float64 oracle (with the dynamic activation quantization of W8A8 schemes)."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance import quantize
from heteroserve.conformance.cases.linear import FP8_SCHEMES, LinearCase, linear_cases
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.kernels.linear import LinearShape


def checkpoint(case: LinearCase, w: torch.Tensor, fp8_dtype: torch.dtype | None,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The scheme's checkpoint tensors for float64 weight ``w [N, K]``."""
    s = case.scheme
    if s == "unquantized":
        return {"weight": w.to(case.dtype)}
    if s == "fp8_per_tensor":
        return quantize.quantize_fp8_per_tensor(w, fp8_dtype)  # type: ignore[arg-type]
    if s == "fp8_block":
        return quantize.quantize_fp8_block(w, fp8_dtype)  # type: ignore[arg-type]
    if s == "int8_w8a8":
        return quantize.quantize_int8_per_channel(w)
    if s == "awq_w4a16":
        return quantize.pack_awq(w, case.group_size)
    if s == "gptq_w4a16":
        g_idx = None
        if case.has_g_idx:  # act-order: groups assigned through a random permutation
            perm = torch.randperm(case.in_features, generator=gen)
            g_idx = torch.empty(case.in_features, dtype=torch.int64)
            g_idx[perm] = torch.arange(case.in_features) // case.group_size
        return quantize.pack_gptq(w, case.group_size, g_idx)
    raise ValueError(f"unknown scheme {s!r}")


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@conformance(linear_cases)
def test_linear(conf: ConfParam, ctx: ConformanceContext,
                request: pytest.FixtureRequest) -> None:
    case: LinearCase = conf.case  # type: ignore[assignment]
    method = conf.load()()
    dev, dt = ctx.device, case.dtype
    specs = method.create_weights(LinearShape(case.in_features, case.out_features, dt,
                                              case.group_size, case.has_g_idx))
    flavour = ctx.capabilities.fp8_flavour
    act_fp8 = flavour.torch_dtype if flavour is not None else None
    weight_spec = specs.get("weight")
    w_fp8 = weight_spec.dtype if weight_spec is not None and case.scheme in FP8_SCHEMES \
        else act_fp8
    gen = case.generator()
    w = torch.randn(case.out_features, case.in_features, generator=gen,
                    dtype=torch.float64) * case.in_features ** -0.5
    ckpt = checkpoint(case, w, w_fp8, gen)
    assert set(specs) == set(ckpt), \
        f"create_weights names {sorted(specs)}, the {case.scheme} checkpoint has {sorted(ckpt)}"
    layer = torch.nn.Module()
    for name, spec in specs.items():
        t = ckpt[name]
        assert (tuple(spec.shape), spec.dtype) == (tuple(t.shape), t.dtype), \
            f"create_weights {name}: {spec.dtype}{list(spec.shape)}, checkpoint has " \
            f"{t.dtype}{list(t.shape)}"
        layer.register_parameter(name, torch.nn.Parameter(t.to(dev), requires_grad=False))
    method.process_weights_after_loading(layer)
    processed = getattr(layer, "weight", None)
    if case.scheme in FP8_SCHEMES and processed is not None and processed.dtype in FP8_DTYPES:
        act_fp8 = processed.dtype  # the contract: activations take the weight's fp8 format
    bias = (torch.randn(case.out_features, generator=gen, dtype=torch.float64)
            .to(dt)) if case.bias else None
    if case.scheme in ("fp8_per_tensor", "fp8_block", "int8_w8a8"):
        x = quantize.w8a8_activations(gen, case.tokens, case.in_features, case.scheme, dt,
                                      act_fp8)
    else:
        x = torch.randn(case.tokens, case.in_features, generator=gen,
                        dtype=torch.float64).to(dt)
    x_dev, bias_dev = x.to(dev), bias.to(dev) if bias is not None else None
    out = run_op(lambda: method.apply(layer, x_dev, bias_dev), tuple)
    assert_bitwise_equal(x_dev, x, "apply must not modify x")
    ref = oracle.linear(case.scheme, x, ckpt, case.group_size, bias, act_fp8)
    assert_close(out, ref, dt, f"linear.{case.scheme}", request)
