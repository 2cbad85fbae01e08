"""Graph replay equals eager: capture a decode attention step plus RMSNorm with the platform's
graph runner, change the inputs in place, replay, and compare with calling the ops eagerly.
Runs for every attention backend (and for :class:`EagerGraphRunner` platforms too). Fused MoE
likewise, with new activations, routing ids and weights before the replay; the fused q/k
norm + rotary with new q/k values and positions."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance.attention_setup import make_setup, write_and_check
from heteroserve.conformance.cases.moe import FusedMoECase, fused_moe_graph_cases
from heteroserve.conformance.cases.platform import graph_cases
from heteroserve.conformance.cases.qk_norm import QKNormRotaryCase, qk_norm_rotary_graph_cases
from heteroserve.conformance.checks import assert_close
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import moe as moe_oracle
from heteroserve.conformance.oracles.attention import attention as attention_ref
from heteroserve.conformance.oracles.norm import rms_norm as rms_norm_ref
from heteroserve.conformance.oracles.qk_norm import qk_norm_rotary as qk_norm_rotary_ref
from heteroserve.conformance.paged import write_slots
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.conformance.test_qk_norm import make_inputs
from heteroserve.core.kernels import ops
from heteroserve.core.graph import EagerGraphRunner
from heteroserve.conformance.quantize import quantized_experts
from heteroserve.core.kernels.ops import (
    GRAPH_SAFE_ATTR, MOE_PROCESS_WEIGHTS_ATTR, MOE_WEIGHT_SCHEMES_ATTR, MoEWeightQuant,
)

EPS = 1e-6


def _rms_norm_impl(ctx: ConformanceContext, dtype: torch.dtype):
    for spec in ctx.specs(ops.RMS_NORM):  # highest priority first, as dispatch would pick
        if spec.check(ctx.request(dtype)).ok:
            return spec.load()
    pytest.fail(f"no rms_norm implementation serves {dtype} on {ctx.name}", pytrace=False)


@conformance(graph_cases, label="graph_replay")
def test_graph_replay(conf: ConfParam, ctx: ConformanceContext,
                      request: pytest.FixtureRequest) -> None:
    s = make_setup(conf, ctx)
    case, dev = conf.case, ctx.device
    rms_norm = _rms_norm_impl(ctx, case.dtype)
    write_and_check(s)
    gen = case.generator(salt=1)
    hidden = case.q_heads * case.head_size
    x = randn(gen, len(case.seqs), hidden, dtype=case.dtype, device=dev)
    weight = randn(gen, hidden, dtype=case.dtype, device=dev, scale=0.2, shift=1.0)
    out_attn, out_norm = torch.zeros_like(s.q), torch.zeros_like(x)

    def step() -> None:
        out_attn.copy_(s.backend.decode(s.q, s.k_cache, s.v_cache, s.layer, s.batch.meta))
        out_norm.copy_(rms_norm(x, weight, EPS))

    s.backend.begin_graph_capture(s.batch.meta)  # the hooks the engine's decode graphs call
    graph = ctx.platform.make_graph_runner(dev).capture(step)
    # new values in every static input: q, x and each sequence's cached K/V
    s.q.copy_(randn(gen, *s.q.shape, dtype=case.dtype, device=dev))
    x.copy_(randn(gen, *x.shape, dtype=case.dtype, device=dev))
    for b, n in enumerate(s.batch.meta.seq_lens_cpu):
        s.keys[b] = randn(gen, *s.keys[b].shape, dtype=case.dtype, device=torch.device("cpu"))
        s.values[b] = randn(gen, *s.values[b].shape, dtype=case.dtype, device=torch.device("cpu"))
        write_slots(s.k_cache, s.layout, s.batch.slots(b, 0, n), s.keys[b])
        write_slots(s.v_cache, s.layout, s.batch.slots(b, 0, n), s.values[b])
    s.backend.before_graph_replay(s.batch.meta)
    graph.replay()
    ctx.platform.synchronize(dev)
    replay_attn, replay_norm = out_attn.clone(), out_norm.clone()
    eager_attn = s.backend.decode(s.q, s.k_cache, s.v_cache, s.layer, s.batch.meta)
    eager_norm = rms_norm(x, weight, EPS)
    ctx.platform.synchronize(dev)
    assert_close(replay_attn, eager_attn.double().cpu(), case.dtype,
                 "replayed decode vs eager decode", request)
    assert_close(replay_norm, eager_norm.double().cpu(), case.dtype,
                 "replayed rms_norm vs eager rms_norm", request)
    ref = attention_ref(s.q, s.keys, s.values, [1] * len(case.seqs), s.layer.scale)
    assert_close(replay_attn, ref, case.dtype, "replayed decode vs oracle", request)
    assert_close(replay_norm, rms_norm_ref(x, weight, EPS), case.dtype,
                 "replayed rms_norm vs oracle", request)


@conformance(fused_moe_graph_cases, label="fused_moe_graph_replay")
def test_fused_moe_graph_replay(conf: ConfParam, ctx: ConformanceContext,
                                request: pytest.FixtureRequest) -> None:
    case: FusedMoECase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    runner = ctx.platform.make_graph_runner(ctx.device)
    if not getattr(fn, GRAPH_SAFE_ATTR, False) and not isinstance(runner, EagerGraphRunner):
        pytest.skip(f"{conf.impl} does not declare {GRAPH_SAFE_ATTR} (host-synchronising "
                    "implementations are not captured)")
    quantized = case.weights != "dense"
    if quantized and case.weights not in getattr(fn, MOE_WEIGHT_SCHEMES_ATTR, ()):
        pytest.skip(f"{conf.impl} does not declare {case.weights} in {MOE_WEIGHT_SCHEMES_ATTR}")
    gen = case.generator()
    dev, dt = ctx.device, case.dtype
    wdt = torch.float64 if quantized else dt
    w13 = randn(gen, case.experts, 2 * case.intermediate, case.hidden, dtype=wdt, device=dev,
                scale=case.hidden ** -0.5)
    w2 = randn(gen, case.experts, case.hidden, case.intermediate, dtype=wdt, device=dev,
               scale=case.intermediate ** -0.5)
    kwargs: dict[str, MoEWeightQuant] = {}
    if quantized:  # stored values + scales in; the oracle sees the dequantized weights
        w13_k, w2_k, kwargs["quant"], w13, w2 = quantized_experts(case.weights, w13, w2,
                                                                  case.group, dev)
    else:
        w13_k, w2_k = w13, w2
    process = getattr(fn, MOE_PROCESS_WEIGHTS_ATTR, None)
    if process is not None:  # the implementation's own expert layout, as the MoE layer does
        w13_k, w2_k = process(w13_k.clone(), w2_k.clone())

    def routing() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.rand(case.tokens, case.experts, generator=gen).topk(case.top_k, dim=-1)
        return (torch.softmax(torch.randn(case.tokens, case.top_k, generator=gen), dim=-1),
                ids.indices.to(torch.int32))

    x = randn(gen, case.tokens, case.hidden, dtype=dt, device=dev)
    weights, ids = (t.to(dev) for t in routing())
    out = torch.zeros_like(x)

    def step() -> None:
        out.copy_(fn(x, w13_k, w2_k, weights, ids, **kwargs))

    graph = runner.capture(step)
    new_weights, new_ids = routing()
    x.copy_(randn(gen, case.tokens, case.hidden, dtype=dt, device=dev))
    weights.copy_(new_weights.to(dev))
    ids.copy_(new_ids.to(dev))
    graph.replay()
    ctx.platform.synchronize(dev)
    assert_close(out, moe_oracle.fused_moe(x, w13, w2, new_weights, new_ids), dt,
                 "replayed fused_moe (new x, ids, weights) vs oracle", request)


@conformance(qk_norm_rotary_graph_cases, label="qk_norm_graph_replay")
def test_qk_norm_rotary_graph_replay(conf: ConfParam, ctx: ConformanceContext,
                                     request: pytest.FixtureRequest) -> None:
    case: QKNormRotaryCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    runner = ctx.platform.make_graph_runner(ctx.device)
    if not getattr(fn, GRAPH_SAFE_ATTR, False) and not isinstance(runner, EagerGraphRunner):
        pytest.skip(f"{conf.impl} does not declare {GRAPH_SAFE_ATTR} (host-synchronising "
                    "implementations are not captured)")
    inp = make_inputs(case, ctx.device)
    q, k = inp.views(case)  # views of the static qkv buffer, as in a decode graph
    out_q, out_k = torch.zeros_like(q), torch.zeros_like(k)

    def step() -> None:
        got_q, got_k = fn(q, k, inp.q_weight, inp.k_weight, case.eps, inp.positions_dev,
                          inp.cache_dev, case.is_neox)
        out_q.copy_(got_q)
        out_k.copy_(got_k)

    graph = runner.capture(step)
    new = make_inputs(case, ctx.device, salt=1)
    inp.qkv.copy_(new.qkv)
    inp.positions_dev.copy_(new.positions_dev)
    q0, k0 = (t.clone() for t in new.views(case))
    graph.replay()
    ctx.platform.synchronize(ctx.device)
    for got, x, w, what in ((out_q, q0, inp.q_weight, "q"), (out_k, k0, inp.k_weight, "k")):
        ref = qk_norm_rotary_ref(x, w, case.eps, new.positions, inp.cache, case.is_neox)
        assert_close(got, ref, case.dtype, f"replayed qk_norm_rotary {what} (new q, k, "
                     "positions) vs oracle", request)
