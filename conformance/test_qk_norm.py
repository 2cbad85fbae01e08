"""Conformance of the fused per-head q/k RMSNorm + rotary op against the composed float64
oracles: strided (fused-qkv views) and contiguous q/k, neox and GPT-J, partial rotary, GQA;
nothing outside q and k is written; inputs the contract rules out raise."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from heteroserve.conformance.cases.qk_norm import (
    QKNormRotaryCase, qk_norm_rotary_cases, qk_norm_rotary_refused_cases,
)
from heteroserve.conformance.checks import assert_bitwise_equal, assert_close, run_op
from heteroserve.conformance.context import ConformanceContext
from heteroserve.conformance.inputs import randn
from heteroserve.conformance.oracles import qk_norm as oracle
from heteroserve.conformance.oracles.rotary import cos_sin_cache
from heteroserve.conformance.params import ConfParam, conformance

#: columns after v in the strided buffer, so a write past k's rows shows too
PAD = 24


@dataclass
class QKInputs:
    """A case's inputs: the qkv buffer (q, k, v and padding, on the device) of heads of
    ``head_size``, the norm weights, host positions and the float64 cache (device copies
    alongside)."""

    qkv: torch.Tensor
    head_size: int
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    positions: torch.Tensor
    cache: torch.Tensor
    positions_dev: torch.Tensor
    cache_dev: torch.Tensor

    def views(self, case: QKNormRotaryCase) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[T, Hq, D]`` and k ``[T, Hk, D]`` of ``self.qkv``: views (strided cases) or
        contiguous copies."""
        t, d = case.tokens, self.head_size
        q_cols, k_cols = case.q_heads * d, case.kv_heads * d
        q = self.qkv[:, :q_cols].view(t, case.q_heads, d)
        k = self.qkv[:, q_cols:q_cols + k_cols].view(t, case.kv_heads, d)
        return (q, k) if case.strided else (q.clone(), k.clone())


def make_inputs(case: QKNormRotaryCase, device: torch.device, salt: int = 0,
                weight_size: int | None = None) -> QKInputs:
    """Reproducible inputs for ``case`` on ``device`` (``weight_size`` overrides the norm
    weights' width, for refusal cases)."""
    gen = case.generator(salt)
    d = case.head_size if weight_size is None else weight_size
    width = (case.q_heads + 2 * case.kv_heads) * d + PAD
    qkv = randn(gen, case.tokens, width, dtype=case.dtype, device=device, scale=case.amplitude)
    qw = randn(gen, case.head_size, dtype=case.dtype, device=device, scale=0.2, shift=1.0)
    kw = randn(gen, case.head_size, dtype=case.dtype, device=device, scale=0.2, shift=1.0)
    positions = torch.randint(0, case.max_position, (case.tokens,), generator=gen)
    positions[0] = 0
    cache = cos_sin_cache(case.max_position, case.rotary_dim)
    return QKInputs(qkv, d, qw, kw, positions, cache, positions.to(device),
                    cache.to(torch.float32).to(device))


@conformance(qk_norm_rotary_cases)
def test_qk_norm_rotary(conf: ConfParam, ctx: ConformanceContext,
                        request: pytest.FixtureRequest) -> None:
    case: QKNormRotaryCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    inp = make_inputs(case, ctx.device)
    original = inp.qkv.clone()

    def args() -> tuple:
        inp.qkv.copy_(original)  # the op may work in place on the views
        q, k = inp.views(case)
        return (q, k, inp.q_weight, inp.k_weight, case.eps, inp.positions_dev, inp.cache_dev,
                case.is_neox)

    out = run_op(fn, args, determinism=False)
    assert isinstance(out, tuple) and len(out) == 2, "qk_norm_rotary returns (q, k)"
    q0, k0 = (original[:, :case.q_heads * case.head_size].view(case.tokens, case.q_heads, -1),
              original[:, case.q_heads * case.head_size:(case.q_heads + case.kv_heads)
                       * case.head_size].view(case.tokens, case.kv_heads, -1))
    for got, x, w, what in ((out[0], q0, inp.q_weight, "q"), (out[1], k0, inp.k_weight, "k")):
        ref = oracle.qk_norm_rotary(x, w, case.eps, inp.positions, inp.cache, case.is_neox)
        assert_close(got, ref, case.dtype, f"qk_norm_rotary {what}", request)
    v_from = (case.q_heads + case.kv_heads) * case.head_size
    assert_bitwise_equal(inp.qkv[:, v_from:], original[:, v_from:],
                         "qk_norm_rotary must not write v or the padding after it")
    first = tuple(t.clone() for t in fn(*args()))
    assert_bitwise_equal(first, fn(*args()), "determinism (same inputs, two calls)")


@conformance(qk_norm_rotary_refused_cases)
def test_qk_norm_rotary_refuses_wrong_weight(conf: ConfParam, ctx: ConformanceContext) -> None:
    case: QKNormRotaryCase = conf.case  # type: ignore[assignment]
    fn = conf.load()
    inp = make_inputs(case, ctx.device, weight_size=64)  # q/k head size 64, weights 65
    q, k = inp.views(case)
    try:
        out = fn(q, k, inp.q_weight, inp.k_weight, case.eps, inp.positions_dev, inp.cache_dev,
                 case.is_neox)
        ctx.platform.synchronize(ctx.device)
    except Exception:
        return
    pytest.fail(f"{conf.impl} accepted norm weights of {case.head_size} for heads of 64 and "
                f"returned {type(out).__name__}", pytrace=False)
