"""Conformance of every attention backend: exact KV writes, extend and decode against the
float64 oracle (and ``forward_prologue`` where implemented), over the grid of
:mod:`heteroserve.conformance.cases.attention`."""

from __future__ import annotations

import pytest
import torch

from heteroserve.conformance.attention_setup import (
    expected_cache, flat_slots, make_setup, write_and_check,
)
from heteroserve.conformance.cases.attention import AttnCase, attention_cases
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles import norm as norm_ref
from heteroserve.conformance.oracles import rotary as rotary_ref
from heteroserve.conformance.oracles.attention import attention as attention_ref
from heteroserve.conformance.params import ConfParam, conformance
from heteroserve.core.kernels.attention import AttentionPrologue


@conformance(attention_cases("write_kv"))
def test_attention_write_kv(conf: ConfParam, ctx: ConformanceContext) -> None:
    write_and_check(make_setup(conf, ctx))


def _attend(conf: ConfParam, ctx: ConformanceContext, request: pytest.FixtureRequest) -> None:
    s = make_setup(conf, ctx)
    case: AttnCase = conf.case  # type: ignore[assignment]
    write_and_check(s)
    k_before, v_before, q_before = s.k_cache.clone(), s.v_cache.clone(), s.q.clone()
    fn = s.backend.decode if case.kind == "decode" else s.backend.extend
    out = run_op(lambda: fn(s.q, s.k_cache, s.v_cache, s.layer, s.batch.meta), tuple)
    assert_bitwise_equal((s.k_cache, s.v_cache, s.q), (k_before, v_before, q_before),
                         f"{case.kind} must not modify q or the caches")
    ref = attention_ref(s.q, s.keys, s.values, [n for _, n in case.seqs], s.layer.scale,
                        case.sliding_window, case.logit_cap)
    assert_close(out, ref, case.dtype, f"{case.kind} output", request)


@conformance(attention_cases("extend"))
def test_attention_extend(conf: ConfParam, ctx: ConformanceContext,
                          request: pytest.FixtureRequest) -> None:
    _attend(conf, ctx, request)


@conformance(attention_cases("decode"))
def test_attention_decode(conf: ConfParam, ctx: ConformanceContext,
                          request: pytest.FixtureRequest) -> None:
    _attend(conf, ctx, request)


@conformance(attention_cases("decode"))
def test_attention_forward_decode(conf: ConfParam, ctx: ConformanceContext,
                                  request: pytest.FixtureRequest) -> None:
    """``forward`` (which a backend may fuse: KV store inside the attention kernel) leaves the
    caches exactly as ``write_kv`` does and attends like ``write_kv`` + ``decode``."""
    s = make_setup(conf, ctx)
    case: AttnCase = conf.case  # type: ignore[assignment]
    s.backend.prepare(s.batch.meta)
    out = run_op(lambda: s.backend.forward(s.q, s.k_new, s.v_new, s.k_cache, s.v_cache,
                                           s.layer, s.batch.meta), tuple)
    for name, cache, seqs in (("k", s.k_cache, s.keys), ("v", s.v_cache, s.values)):
        assert_bitwise_equal(flat_slots(cache, s.layout), expected_cache(s, cache, seqs),
                             f"forward: {name} cache (only the new tokens' slots may change)")
    ref = attention_ref(s.q, s.keys, s.values, [n for _, n in case.seqs], s.layer.scale,
                        case.sliding_window, case.logit_cap)
    assert_close(out, ref, case.dtype, "forward (decode) output", request)


def _forward_prologue(conf: ConfParam, ctx: ConformanceContext,
                      request: pytest.FixtureRequest) -> None:
    """``forward_prologue`` (optional: skipped where it returns None for every variant) of
    un-normed, un-rotated q / k passed as strided views of one qkv projection output, as a
    decoder layer passes them, with a per-head qk-norm and without, in both rotary styles, over
    whole heads and part of each: for each variant the backend folds, the new K slots hold the
    float64 norm and rotation (within the dtype's bound), V and every other slot are exact,
    the output is the oracle's over the normed, rotated queries, and the inputs are left as
    they were."""
    case: AttnCase = conf.case  # type: ignore[assignment]
    if case.kv_fp8:
        pytest.skip("fp8 caches: a rounding flip of one fp8 step exceeds the dtype's bound")
    dt, d = case.dtype, case.head_size
    folded = 0
    # (qk-norm, NeoX style, rotary width): whole heads, and a partial rotation (Phi / GLM)
    for qk_norm, is_neox, rot in ((True, True, d), (False, False, d // 4 * 2),
                                  (True, False, d), (False, True, d)):
        s = make_setup(conf, ctx)
        dev = s.q.device
        gen = case.generator(11)
        qkv = torch.cat([s.q.flatten(1) * 2.0, s.k_new.flatten(1) * 2.0, s.v_new.flatten(1)],
                        dim=1)  # O(2) rows: the norm changes them
        hq, hk = case.q_heads * d, case.kv_heads * d
        q, k, v = (x.view(x.shape[0], -1, d) for x in qkv.split([hq, hk, hk], dim=1))
        positions = torch.cat([torch.arange(p, p + n, dtype=torch.int64)
                               for p, n in case.seqs]).to(dev)
        table = rotary_ref.cos_sin_cache(max(p + n for p, n in case.seqs) + 2,
                                         rot).float().to(dev)
        weights = [(torch.rand(d, generator=gen, dtype=torch.float64) + 0.5).to(dt).to(dev)
                   for _ in range(2)]
        prologue = AttentionPrologue(positions, table, is_neox,
                                     *(weights if qk_norm else (None, None)), 1e-6)
        before = qkv.clone()
        s.backend.prepare(s.batch.meta)

        def call() -> torch.Tensor | None:
            return s.backend.forward_prologue(q, k, v, s.k_cache, s.v_cache, s.layer,
                                              s.batch.meta, prologue)

        if call() is None:  # this variant is the layer's to run (optional)
            continue
        folded += 1
        out = run_op(call, tuple)  # stores the same new K/V again
        label = f"(qk_norm={qk_norm}, is_neox={is_neox}, rotary width {rot})"
        assert_bitwise_equal(qkv, before, f"forward_prologue must not modify its inputs {label}")
        q_ref, k_ref = (x.double().cpu() for x in (q, k))
        if qk_norm:
            q_ref = norm_ref.rms_norm(q_ref, weights[0], 1e-6)
            k_ref = norm_ref.rms_norm(k_ref, weights[1], 1e-6)
        q_ref = rotary_ref.rotate(positions, q_ref, table, is_neox)
        k_ref = rotary_ref.rotate(positions, k_ref, table, is_neox)
        k_got = flat_slots(s.k_cache, s.layout)[s.batch.meta.out_cache_loc.cpu()]
        assert_close(k_got, k_ref, dt, f"new K slots {label}", request)
        keys, row = [x.clone() for x in s.keys], 0
        for b, (p, n) in enumerate(case.seqs):
            keys[b][p:p + n] = k_got[row:row + n]
            row += n
        for name, cache, seqs in (("k", s.k_cache, keys), ("v", s.v_cache, s.values)):
            assert_bitwise_equal(flat_slots(cache, s.layout), expected_cache(s, cache, seqs),
                                 f"forward_prologue: {name} cache (only the new tokens' slots "
                                 f"may change) {label}")
        ref = attention_ref(q_ref, keys, s.values, [n for _, n in case.seqs], s.layer.scale,
                            case.sliding_window, case.logit_cap)
        assert_close(out, ref, dt, f"forward_prologue ({case.kind}) output {label}", request)
    if not folded:
        pytest.skip("forward_prologue returns None (optional): the layer runs the qk-norm "
                    "and rotary ops before forward")


@conformance(attention_cases("decode"))
def test_attention_forward_prologue_decode(conf: ConfParam, ctx: ConformanceContext,
                                           request: pytest.FixtureRequest) -> None:
    _forward_prologue(conf, ctx, request)


@conformance(attention_cases("extend"))
def test_attention_forward_prologue_extend(conf: ConfParam, ctx: ConformanceContext,
                                           request: pytest.FixtureRequest) -> None:
    _forward_prologue(conf, ctx, request)
