"""Triton MoE: pair alignment, top-k softmax routing and fused MoE against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_refs import rel_err


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_align_pairs(device: torch.device) -> None:
    from heteroserve.platforms.triton.moe_align import align_pairs

    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]], dtype=torch.int32)
    a = align_pairs(ids.to(device), num_experts=5, block_m=4)
    rows = int(a.num_rows.item())
    sorted_ids = a.sorted_ids.cpu()[:rows].tolist()
    # expert 0: pairs 1, 4; expert 1: pair 3; expert 2: pairs 0, 2, 5, 6; expert 3: pair 7
    # (any order within a run)
    assert rows == 16
    runs = [sorted_ids[0:4], sorted_ids[4:8], sorted_ids[8:12], sorted_ids[12:16]]
    assert [sorted(r) for r in runs] == [[1, 4, 8, 8], [3, 8, 8, 8], [0, 2, 5, 6], [7, 8, 8, 8]]
    assert a.block_experts.cpu().tolist() == [0, 1, 2, 3] + [5] * (a.block_experts.numel() - 4)
    assert a.sorted_ids.numel() % 4 == 0 and a.sorted_ids.numel() >= rows


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [
    (300, 8, 128, 16), (1, 6, 66, 64), (700, 2, 5, 32), (129, 8, 128, 128), (3, 3, 3, 16)])
def test_align_pairs_matches_torch(device: torch.device, tokens: int, top_k: int,
                                   experts: int, block_m: int) -> None:
    """The one-launch alignment holds the reference's runs (same rows, blocks and counts;
    each run the same pairs, in any order), over more than one 1024-pair chunk."""
    from heteroserve.platforms.triton.moe_align import align_pairs, align_pairs_torch

    g = _gen(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    ids[: tokens // 3] = ids[0]  # a third of the tokens on the same experts: long runs
    ids = ids.to(torch.int32)
    got = align_pairs(ids.to(device), experts, block_m)
    ref = align_pairs_torch(ids, experts, block_m)
    rows = int(ref.num_rows.item())
    assert int(got.num_rows.item()) == rows
    assert torch.equal(got.block_experts.cpu(), ref.block_experts)
    assert got.sorted_ids.shape == ref.sorted_ids.shape
    got_rows = got.sorted_ids.cpu().view(-1, block_m)
    ref_rows = ref.sorted_ids.view(-1, block_m)
    for e in range(experts + 1):  # each expert's run (and the tail) as a set
        run = ref.block_experts == e
        assert torch.equal(got_rows[run].flatten().sort().values,
                           ref_rows[run].flatten().sort().values)


@pytest.mark.parametrize("experts,top_k,renorm", [(8, 2, True), (60, 4, False), (3, 3, True)])
def test_topk_softmax(device: torch.device, experts: int, top_k: int, renorm: bool) -> None:
    from heteroserve.platforms.triton.moe import topk_softmax

    logits = torch.randn(9, experts, generator=_gen(experts))
    logits[0, :] = 0.5  # all tied: ids 0..k-1 in order
    w, ids = topk_softmax(logits.to(device), top_k, renorm)
    probs = torch.softmax(logits.double(), -1)
    ref_w, ref_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    ref_w, ref_ids = ref_w[:, :top_k], ref_ids[:, :top_k]
    if renorm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.cpu().long(), ref_ids)
    assert rel_err(w, ref_w) < 1e-6
    with pytest.raises(ValueError, match="top_k"):
        topk_softmax(logits.to(device), experts + 1, renorm)


def _moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor,
             ids: torch.Tensor) -> torch.Tensor:
    x, w13, w2, tw = x.double(), w13.double(), w2.double(), tw.double()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += tw[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("path", ["fused_moe", "grouped_moe"])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", [(5, 4, 2, 32, 24), (1, 8, 3, 48, 16),
                                                               (20, 3, 1, 16, 40)])
def test_fused_moe(device: torch.device, path: str, tokens: int, experts: int, top_k: int,
                   hidden: int, inter: int) -> None:
    """``fused_moe`` (the decode path at these sizes) and the grouped GEMM it uses above
    ``MAX_DECODE_PAIRS`` pairs, forced."""
    from heteroserve.platforms.triton import moe

    fused_moe = getattr(moe, path)

    g = _gen(tokens * experts)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    tw = torch.rand(tokens, top_k, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    out = fused_moe(x.to(device), w13.to(device), w2.to(device), tw.to(device),
                    ids.to(device, torch.int32))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, _moe_ref(x, w13, w2, tw, ids)) < 1e-5


def test_align_kernel_compiles_for_hopper() -> None:
    """The one-launch alignment (atomics, barriers, a cumsum) builds for sm_90a (no GPU)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from ptx_check import hopper_ptx

    names = ["ids_ptr", "scratch_ptr", "sorted_ptr", "blocks_ptr", "num_rows_ptr"]
    sig = {**dict.fromkeys(names, "*i32"), **dict.fromkeys(["n", "num_experts", "max_rows"], "i32"),
           **dict.fromkeys(["BLOCK_M", "BINS", "CHUNK", "BLOCK_B"], "constexpr")}
    jobs = [{"module": "heteroserve.platforms.triton.moe_align", "kernel": "_align_kernel",
             "signature": sig, "aligned": names, "num_warps": 4,
             "constexprs": {"BLOCK_M": bm, "BINS": 128, "CHUNK": 1024, "BLOCK_B": 64}}
            for bm in (16, 128)]
    assert all(r["ptx_lines"] > 0 for r in hopper_ptx(jobs))


def test_align_pairs_above_the_kernel_limit_takes_torch(monkeypatch: pytest.MonkeyPatch,
                                                         device: torch.device) -> None:
    from heteroserve.platforms.triton import moe_align

    monkeypatch.setattr(moe_align, "ALIGN_KERNEL_MAX_PAIRS", 8)
    ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3], [1, 1]], dtype=torch.int32).to(device)
    got = moe_align.align_pairs(ids, 5, 4)  # 10 pairs: the stable torch order
    ref = moe_align.align_pairs_torch(ids, 5, 4)
    assert torch.equal(got.sorted_ids, ref.sorted_ids)
    assert torch.equal(got.block_experts, ref.block_experts)
