"""``routed_moe`` (the ``RoutedFusedMoEOp`` of the Triton ``fused_moe``): the decode kernels
that route themselves choose exactly the experts of ``topk_softmax`` (ties, padding, shared
slots) and weight them as it does, on both sides of the decode / grouped switch, with dense
and fp8_block experts."""

from __future__ import annotations

import pytest
import torch
from triton_refs import rel_err

from heteroserve.core.kernels.ops import MOE_ROUTED_ATTR, MoERouting
from heteroserve.platforms.triton import moe, moe_decode


def _separate(x, w13, w2, logits, routing: MoERouting, quant=None) -> torch.Tensor:
    """The routing op, the scaling and the shared slots, then ``fused_moe``: what
    ``routed_moe`` must equal."""
    weights, ids = moe.topk_softmax(logits, routing.top_k, routing.renormalize)
    weights = weights * routing.scaling
    t, e_r = logits.shape
    shared = torch.arange(e_r, e_r + routing.shared, dtype=torch.int32, device=ids.device)
    ids = torch.cat([ids, shared.expand(t, routing.shared)], dim=1)
    weights = torch.cat([weights, weights.new_ones(t, routing.shared)], dim=1)
    return moe.fused_moe(x, w13, w2, weights, ids, quant)


def _operands(tokens: int, routed: int, shared: int, hidden: int, inter: int, seed: int,
              ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    e = routed + shared
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(e, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(e, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(tokens, routed, generator=g) * 2
    if ties:  # repeated maxima: the lower id must come first
        logits[:, ::3] = logits.max(dim=1, keepdim=True).values
    return x, w13, w2, logits


# (tokens, routed experts, top_k, shared, renormalize, scaling, ties)
DECODE = [(1, 8, 2, 0, True, 1.0, False), (3, 60, 6, 2, False, 1.0, False),
          (2, 16, 4, 1, True, 2.5, True), (1, 128, 8, 0, True, 1.0, False),
          (5, 12, 3, 0, False, 1.0, True)]


@pytest.mark.parametrize("tokens,routed,top_k,shared,renorm,scaling,ties", DECODE)
def test_routed_decode_equals_the_routing_op_then_fused_moe(
        device: torch.device, tokens: int, routed: int, top_k: int, shared: int, renorm: bool,
        scaling: float, ties: bool) -> None:
    x, w13, w2, logits = (t.to(device) for t in _operands(tokens, routed, shared, 64, 32,
                                                         routed + tokens, ties))
    routing = MoERouting(top_k, renorm, scaling, shared)
    assert tokens * routing.width <= moe.MAX_DECODE_PAIRS
    calls = []
    real = moe_decode._launch

    def spy(*args, **kwargs):
        calls.append(args[6])
        return real(*args, **kwargs)

    moe_decode._launch = spy
    try:
        out = moe.routed_moe(x, w13, w2, logits, routing)
    finally:
        moe_decode._launch = real
    assert calls == [routing], "the decode kernels route (no routing op)"
    want = _separate(x, w13, w2, logits, routing)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, want) < 1e-5


def test_routed_decode_with_bf16_logits_and_strided_rows(device: torch.device) -> None:
    x, w13, w2, logits = (t.to(device) for t in _operands(2, 16, 0, 64, 32, 7))
    wide = torch.zeros(2, 40, dtype=torch.bfloat16, device=device)
    wide[:, :16] = logits.to(torch.bfloat16)
    routing = MoERouting(4, True)
    out = moe.routed_moe(x, w13, w2, wide[:, :16], routing)
    assert rel_err(out, _separate(x, w13, w2, wide[:, :16].contiguous(), routing)) < 1e-5


def test_routed_many_tokens_take_the_routing_op_and_the_grouped_gemm(
        device: torch.device) -> None:
    x, w13, w2, logits = (t.to(device) for t in _operands(12, 16, 1, 64, 32, 3))
    routing = MoERouting(6, False, 1.5, 1)  # 12 x 7 = 84 slots > 64
    out = moe.routed_moe(x, w13, w2, logits, routing)
    assert rel_err(out, _separate(x, w13, w2, logits, routing)) < 1e-5


def test_routed_decode_fp8_block_experts(device: torch.device) -> None:
    from heteroserve.conformance.quantize import quantize_fp8_block_experts
    from heteroserve.core.kernels.ops import MoEWeightQuant

    x, w13, w2, logits = _operands(2, 8, 1, 128, 128, 11)
    w13_q, s13, _ = quantize_fp8_block_experts(w13.double())
    w2_q, s2, _ = quantize_fp8_block_experts(w2.double())
    # the interpreter runs the kernels on any float storage: the fp8 values as fp32
    w13_s, w2_s = w13_q.to(torch.float32).to(device), w2_q.to(torch.float32).to(device)
    quant = MoEWeightQuant("fp8_block", s13.to(device), s2.to(device))
    routing = MoERouting(3, True, 1.0, 1)
    x, logits = x.to(device), logits.to(device)
    out = moe.routed_moe(x, w13_s, w2_s, logits, routing, quant)
    assert rel_err(out, _separate(x, w13_s, w2_s, logits, routing, quant)) < 1e-5


def test_routed_refuses_logits_that_do_not_fit_the_experts() -> None:
    x, w13, w2, logits = _operands(1, 8, 0, 64, 32, 1)
    with pytest.raises(ValueError, match="E_r \\+ shared"):
        moe.routed_moe(x, w13, w2, logits, MoERouting(2, True, 1.0, 1))
    with pytest.raises(ValueError, match="top_k"):
        moe.routed_moe(x, w13, w2, logits, MoERouting(9, True))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        MoERouting(0, True)


def test_fused_moe_declares_its_routed_form() -> None:
    assert getattr(moe.fused_moe, MOE_ROUTED_ATTR) is moe.routed_moe


def test_wider_routers_take_the_routing_op(device: torch.device, monkeypatch) -> None:
    x, w13, w2, logits = (t.to(device) for t in _operands(1, moe.MAX_ROUTED_EXPERTS + 8, 0,
                                                         64, 32, 5))
    calls = []
    monkeypatch.setattr(moe, "decode_moe_routed", lambda *a, **k: calls.append(a))
    routing = MoERouting(2, True)
    out = moe.routed_moe(x, w13, w2, logits, routing)
    assert calls == []
    assert rel_err(out, _separate(x, w13, w2, logits, routing)) < 1e-5
