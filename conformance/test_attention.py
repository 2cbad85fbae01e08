"""Conformance of every attention backend: exact KV writes, extend and decode against the
float64 oracle, over the grid of :mod:`heteroserve.conformance.cases.attention`."""

from __future__ import annotations

import pytest

from heteroserve.conformance.attention_setup import (
    expected_cache, flat_slots, make_setup, write_and_check,
)
from heteroserve.conformance.cases.attention import AttnCase, attention_cases
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.oracles.attention import attention as attention_ref
from heteroserve.conformance.params import ConfParam, conformance


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
