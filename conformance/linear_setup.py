"""Building a linear layer for the conformance suite: float64 weights, the scheme's
checkpoint tensors from the suite's own quantizers, and the method's load path
(``create_weights`` names and layouts checked, then ``process_weights_after_loading``)."""

from __future__ import annotations

import torch

from heteroserve.conformance import quantize
from heteroserve.conformance.cases.linear import FP8_SCHEMES, LinearCase
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.core.kernels.linear import LinearMethod, LinearShape

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def checkpoint(case: LinearCase, w: torch.Tensor, fp8_dtype: torch.dtype | None,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The scheme's checkpoint tensors for float64 weight ``w [N, K]``."""
    s = case.scheme
    if s == "unquantized":
        return {"weight": w.to(case.dtype)}
    if s == "fp8_per_tensor":
        return quantize.quantize_fp8_per_tensor(w, fp8_dtype)  # type: ignore[arg-type]
    if s == "fp8_per_channel":
        return quantize.quantize_fp8_per_channel(w, fp8_dtype)  # type: ignore[arg-type]
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


def load_layer(case: LinearCase, method: LinearMethod, ctx: ConformanceContext
               ) -> tuple[torch.nn.Module, dict[str, torch.Tensor], torch.dtype | None,
                          torch.Generator]:
    """``(layer, checkpoint tensors, activation fp8 dtype, generator)`` for ``case``: the
    layer holds the checkpoint on ``ctx.device`` after ``process_weights_after_loading``; the
    fp8 dtype is the one activations take (the processed weight's, per the contract), None
    without fp8; the generator continues the case's stream for the inputs."""
    specs = method.create_weights(LinearShape(case.in_features, case.out_features, case.dtype,
                                              case.group_size, case.has_g_idx))
    flavour = ctx.capabilities.fp8_flavour
    act_fp8 = flavour.torch_dtype if flavour is not None else None
    weight_spec = specs.get("weight")
    w_fp8 = weight_spec.dtype if weight_spec is not None and case.scheme in FP8_SCHEMES \
        else act_fp8
    gen = case.generator()
    w = torch.randn(case.out_features, case.in_features, generator=gen,
                    dtype=torch.float64) * case.in_features ** -0.5
    plugin_scheme = ctx.catalog.linear_schemes.get(case.scheme)
    ckpt = (plugin_scheme.quantize(w.clone()) if plugin_scheme is not None
            else checkpoint(case, w, w_fp8, gen))
    assert set(specs) == set(ckpt), \
        f"create_weights names {sorted(specs)}, the {case.scheme} checkpoint has {sorted(ckpt)}"
    layer = torch.nn.Module()
    for name, spec in specs.items():
        t = ckpt[name]
        assert (tuple(spec.shape), spec.dtype) == (tuple(t.shape), t.dtype), \
            f"create_weights {name}: {spec.dtype}{list(spec.shape)}, checkpoint has " \
            f"{t.dtype}{list(t.shape)}"
        layer.register_parameter(name, torch.nn.Parameter(t.to(ctx.device),
                                                          requires_grad=False))
    method.process_weights_after_loading(layer)
    processed = getattr(layer, "weight", None)
    if case.scheme in FP8_SCHEMES and processed is not None and processed.dtype in FP8_DTYPES:
        act_fp8 = processed.dtype  # the contract: activations take the weight's fp8 format
    return layer, ckpt, act_fp8, gen


def reference(case: LinearCase, ctx: ConformanceContext, x: torch.Tensor,
              ckpt: dict[str, torch.Tensor], bias: torch.Tensor | None,
              act_fp8: torch.dtype | None) -> torch.Tensor:
    """Float64 ``x @ W^T (+ bias)`` for ``case``'s checkpoint: the suite's oracle for a
    built-in scheme, the plugin's own ``LinearSchemeSpec.dequantize`` for one a plugin
    defines (its activations unquantized)."""
    plugin_scheme = ctx.catalog.linear_schemes.get(case.scheme)
    if plugin_scheme is None:
        return oracle.linear(case.scheme, x, ckpt, case.group_size, bias, act_fp8)
    w = plugin_scheme.dequantize({k: t.cpu() for k, t in ckpt.items()}).double()
    y = x.double().cpu() @ w.T
    return y if bias is None else y + bias.double().cpu()
