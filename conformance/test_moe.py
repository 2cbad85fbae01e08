"""Conformance of MoE routing (top-k softmax, grouped top-k) and the fused expert MLP."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from heteroserve.conformance.cases.moe import (
    FusedMoECase, GroupedTopKCase, TopKCase, fused_moe_cases, grouped_topk_cases,
    topk_softmax_cases,
)
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import distinct_logits, randn
from heteroserve.conformance.oracles import moe as oracle
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.conformance.quantize import quantized_experts
from heteroserve.core.kernels.ops import (
    MOE_PROCESS_WEIGHTS_ATTR, MOE_SHARED_SLOTS_ATTR, MOE_WEIGHT_SCHEMES_ATTR,
)


def _check_routing(out: object, tokens: int, k: int, experts: int, shared: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed ``(weights, ids)`` ``[T, k]`` of a routing op's result, after checking its
    dtypes, its shape ``[T, k + shared]`` and that the ``shared`` slots hold ids ``experts +
    j`` at weight exactly 1.0."""
    assert isinstance(out, tuple) and len(out) == 2, "routing returns (weights, ids)"
    weights, ids = out
    assert weights.dtype == torch.float32, f"routing weights must be fp32, got {weights.dtype}"
    assert ids.dtype == torch.int32, f"routing ids must be int32, got {ids.dtype}"
    width = k + shared
    assert tuple(weights.shape) == tuple(ids.shape) == (tokens, width), \
        f"routing shapes {list(weights.shape)} / {list(ids.shape)}, expected [{tokens}, {width}]"
    if shared:
        want_ids = torch.arange(experts, experts + shared, dtype=torch.int64).expand(tokens, -1)
        assert_bitwise_equal(ids[:, k:].cpu().long(), want_ids, "shared-expert slot ids")
        assert_bitwise_equal(weights[:, k:].cpu(), torch.ones(tokens, shared),
                             "shared-expert slot weights (exactly 1.0)")
    return weights[:, :k], ids[:, :k]


def _with_shared(fn: Callable[..., Any], shared: int) -> Callable[..., Any]:
    """``fn`` asked for ``shared`` shared-expert slots; skips the test when ``fn`` does not
    declare ``MOE_SHARED_SLOTS_ATTR`` (the model layer then appends them itself)."""
    if not shared:
        return fn
    if not getattr(fn, MOE_SHARED_SLOTS_ATTR, False):
        pytest.skip("does not declare appends_shared_experts (optional): the model appends "
                    "the shared-expert slots itself")
    return functools.partial(fn, shared_experts=shared)


@conformance(topk_softmax_cases)
def test_moe_topk_softmax(conf: ConfParam, ctx: ConformanceContext,
                          request: pytest.FixtureRequest) -> None:
    case: TopKCase = conf.case  # type: ignore[assignment]
    fn = _with_shared(conf.load(), case.shared)
    gen = case.generator()
    logits = distinct_logits(gen, case.tokens, case.experts)
    if case.ties:  # every other row repeats its largest logits: order must follow expert id
        top = logits.max(dim=1, keepdim=True).values
        logits[::2, ::3] = top[::2]
    x = logits.to(case.dtype).to(ctx.device)
    weights, ids = _check_routing(run_op(fn, lambda: (x, case.top_k, case.renormalize)),
                                  case.tokens, case.top_k, case.experts, case.shared)
    ref_w, ref_ids = oracle.topk_softmax(x, case.top_k, case.renormalize)
    assert_bitwise_equal(ids.long(), ref_ids, "expert ids (descending, ties to lower id)")
    assert_close(weights, ref_w, torch.float32, "routing weights", request)


@conformance(grouped_topk_cases)
def test_moe_grouped_topk(conf: ConfParam, ctx: ConformanceContext,
                          request: pytest.FixtureRequest) -> None:
    case: GroupedTopKCase = conf.case  # type: ignore[assignment]
    fn = _with_shared(conf.load(), case.shared)
    for salt in range(100):  # draw until every selection has a clear margin
        gen = case.generator(salt)
        logits = (distinct_logits(gen, case.tokens, case.experts, step=4.0 / case.experts)
                  .to(case.dtype))
        bias = (torch.rand(case.experts, generator=gen, dtype=torch.float64) * 0.2 - 0.1
                ).to(torch.float32) if case.bias else None
        ref_w, ref_ids, margin = oracle.grouped_topk(
            logits, case.top_k, case.renormalize, case.groups, case.topk_group, case.scoring,
            bias, case.scaling)
        if margin > 1e-3:
            break
    x = logits.to(ctx.device)
    bias_dev = bias.to(ctx.device) if bias is not None else None
    out = run_op(fn, lambda: (x, case.top_k, case.renormalize, case.groups, case.topk_group,
                              case.scoring, bias_dev, case.scaling))
    weights, ids = _check_routing(out, case.tokens, case.top_k, case.experts, case.shared)
    order = ids.cpu().long().sort(dim=-1).indices
    assert_bitwise_equal(ids.cpu().long().gather(1, order), ref_ids,
                         "selected experts (as a set per token)")
    assert_close(weights.cpu().gather(1, order), ref_w, torch.float32, "routing weights", request)


@conformance(fused_moe_cases)
def test_fused_moe(conf: ConfParam, ctx: ConformanceContext,
                   request: pytest.FixtureRequest) -> None:
    case: FusedMoECase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    quantized = case.weights != "dense"
    if quantized and case.weights not in getattr(fn, MOE_WEIGHT_SCHEMES_ATTR, ()):
        pytest.skip(f"{conf.impl} does not declare {case.weights} in "
                    f"{MOE_WEIGHT_SCHEMES_ATTR} (the MoE layer dequantizes those experts)")
    gen = case.generator()
    dev, dt = ctx.device, case.dtype
    x = randn(gen, case.tokens, case.hidden, dtype=dt, device=dev)
    wdt = torch.float64 if quantized else dt
    w13 = randn(gen, case.experts, 2 * case.intermediate, case.hidden, dtype=wdt, device=dev,
                scale=case.hidden ** -0.5)
    w2 = randn(gen, case.experts, case.hidden, case.intermediate, dtype=wdt, device=dev,
               scale=case.intermediate ** -0.5)
    scores = torch.rand(case.tokens, case.experts, generator=gen)
    ids = scores.topk(case.top_k, dim=-1).indices.to(torch.int32)
    weights = torch.softmax(torch.randn(case.tokens, case.top_k, generator=gen), dim=-1)
    ids_dev, weights_dev = ids.to(dev), weights.to(dev)
    quant = None
    if quantized:  # stored values + scales go in; the oracle sees their dequantized value
        w13_k, w2_k, quant, w13, w2 = quantized_experts(case.weights, w13, w2, case.group, dev)
    else:
        w13_k, w2_k = w13, w2
    process = getattr(fn, MOE_PROCESS_WEIGHTS_ATTR, None)
    if process is not None:  # the implementation's own expert layout, as the MoE layer does
        w13_k, w2_k = process(w13_k.clone(), w2_k.clone())
    if quant is None:
        out = run_op(fn, lambda: (x, w13_k, w2_k, weights_dev, ids_dev))
    else:
        out = run_op(lambda *a: fn(*a, quant=quant), lambda: (x, w13_k, w2_k, weights_dev,
                                                              ids_dev))
    assert_close(out, oracle.fused_moe(x, w13, w2, weights, ids), dt, "fused_moe", request)
