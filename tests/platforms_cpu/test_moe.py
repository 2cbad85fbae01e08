"""MoE routing and experts against straightforward float64 references."""

from __future__ import annotations

import pytest
import torch

from heteroserve.platforms.cpu.moe import fused_moe, grouped_topk, topk_softmax


def _ref_topk(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda e: (-scores[e], e))[:k]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 2), (7, 16, 4), (5, 3, 3)])
def test_topk_softmax(renormalize: bool, tokens: int, experts: int, k: int) -> None:
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    logits[0, 1] = logits[0, 2] = logits[0].max() + 1  # a tie: lower id first
    weights, ids = topk_softmax(logits.to(torch.bfloat16), k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    probs = torch.softmax(logits.to(torch.bfloat16).double(), -1)
    for t in range(tokens):
        want = _ref_topk(probs[t].tolist(), k)
        assert ids[t].tolist() == want
        w = probs[t, want]
        if renormalize:
            w = w / w.sum()
        torch.testing.assert_close(weights[t].double(), w, atol=1e-6, rtol=1e-5)
    assert ids[0, :2].tolist() == [1, 2]


def _ref_grouped(logits: torch.Tensor, k: int, renorm: bool, groups: int, topk_group: int,
                 scoring: str, bias: torch.Tensor | None, scale: float
                 ) -> list[dict[int, float]]:
    out = []
    for row in logits.double():
        s = torch.softmax(row, 0) if scoring == "softmax" else torch.sigmoid(row)
        biased = s + (bias.double() if bias is not None else 0.0)
        size = len(row) // groups
        gscore = []
        for g in range(groups):
            vals = sorted(biased[g * size:(g + 1) * size].tolist(), reverse=True)
            gscore.append(sum(vals[:2]) if bias is not None else vals[0])
        keep_groups = set(_ref_topk(gscore, topk_group))
        cand = [biased[e].item() if e // size in keep_groups else float("-inf")
                for e in range(len(row))]
        chosen = _ref_topk(cand, k)
        w = {e: s[e].item() for e in chosen}
        total = sum(w.values())
        out.append({e: (v / total if renorm else v) * scale for e, v in w.items()})
    return out


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("renorm,scale", [(True, 1.0), (False, 2.5)])
def test_grouped_topk(scoring: str, with_bias: bool, renorm: bool, scale: float) -> None:
    gen = torch.Generator().manual_seed(7)
    tokens, experts, groups, topk_group, k = 9, 32, 8, 3, 4
    logits = torch.randn(tokens, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.5 if with_bias else None
    weights, ids = grouped_topk(logits, k, renorm, groups, topk_group, scoring, bias, scale)
    assert weights.shape == ids.shape == (tokens, k) and ids.dtype == torch.int32
    for t, want in enumerate(_ref_grouped(logits, k, renorm, groups, topk_group, scoring,
                                          bias, scale)):
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert set(got) == set(want)
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5)


def test_routing_errors() -> None:
    logits = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="scoring"):
        grouped_topk(logits, 2, True, 4, 2, "relu")
    with pytest.raises(ValueError, match="equal groups"):
        grouped_topk(logits, 2, True, 3, 2)
    with pytest.raises(ValueError, match="top_k"):
        grouped_topk(logits, 5, True, 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        topk_softmax(logits, 9, True)


def _ref_moe(x, w13, w2, tw, ti) -> torch.Tensor:
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ti.shape[1]):
            e = int(ti[t, j])
            h = w13[e].double() @ x[t].double()
            a = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t] += tw[t, j].double() * (w2[e].double() @ a)
    return out


@pytest.mark.parametrize("tokens,experts,k", [(1, 4, 2), (13, 8, 2), (6, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe(tokens: int, experts: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(tokens + experts)
    hidden, inter = 32, 24
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5).to(dtype)
    weights, ids = topk_softmax(torch.randn(tokens, experts, generator=gen), k, True)
    ids = ids.clamp(max=experts - 2)  # the last expert never receives a token
    w13[-1] = float("nan")  # so computing it densely would poison the output
    w2[-1] = float("nan")
    out = fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), _ref_moe(x, w13, w2, weights, ids),
                               atol=tol, rtol=tol)


def test_fused_moe_errors() -> None:
    x, w13, w2 = torch.zeros(2, 8), torch.zeros(3, 8, 8), torch.zeros(3, 8, 4)
    weights = torch.ones(2, 1)
    with pytest.raises(ValueError, match="only 3 experts"):
        fused_moe(x, w13, w2, weights, torch.tensor([[0], [3]]))
    with pytest.raises(ValueError, match="disagree"):
        fused_moe(x, w13, torch.zeros(3, 8, 5), weights, torch.zeros(2, 1, dtype=torch.long))


def test_fused_moe_fp8_block_experts_and_bad_scales() -> None:
    """fp8_block experts (declared in ``moe_weight_schemes``) equal the dense product of
    their dequantized weights; a scale of the wrong block grid or another scheme is refused."""
    from heteroserve.conformance.quantize import quantize_fp8_block_experts
    from heteroserve.core.kernels.ops import MOE_WEIGHT_SCHEMES_ATTR, MoEWeightQuant

    assert getattr(fused_moe, MOE_WEIGHT_SCHEMES_ATTR) == ("fp8_block", "w4a16")
    g = torch.Generator().manual_seed(3)
    w13_q, s13, w13 = quantize_fp8_block_experts(torch.randn(3, 256, 200, generator=g,
                                                             dtype=torch.float64) * 0.07)
    w2_q, s2, w2 = quantize_fp8_block_experts(torch.randn(3, 200, 128, generator=g,
                                                          dtype=torch.float64) * 0.09)
    x = torch.randn(4, 200, generator=g)
    weights = torch.rand(4, 2, generator=g)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [2, 0]])
    out = fused_moe(x, w13_q, w2_q, weights, ids, quant=MoEWeightQuant("fp8_block", s13, s2))
    ref = fused_moe(x.double(), w13, w2, weights, ids)
    assert out.dtype == torch.float32
    assert ((out.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe(x, w13_q, w2_q, weights, ids, quant=MoEWeightQuant("fp8_block", s13, s13))
    with pytest.raises(ValueError, match="fp8_block, w4a16"):
        fused_moe(x, w13_q, w2_q, weights, ids, quant=MoEWeightQuant("int4", s13, s2))
