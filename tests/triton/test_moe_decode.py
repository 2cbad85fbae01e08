"""The few-token fused MoE path (``moe_decode.py``) against float64, the threshold that picks
it in ``fused_moe``, its GPU launch shapes, and (on a GPU) graph capture."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from ptx_check import hopper_ptx
from triton_refs import rel_err

from heteroserve.platforms.triton import moe
from heteroserve.platforms.triton.moe_decode import (
    MAX_DECODE_PAIRS, DecodeConfig, DecodeTile, choose_tiles, decode_moe,
)


def _moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor,
             ids: torch.Tensor) -> torch.Tensor:
    x, w13, w2, tw = x.double().cpu(), w13.double().cpu(), w2.double().cpu(), tw.double().cpu()
    ids = ids.cpu()
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += tw[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def _problem(tokens: int, experts: int, top_k: int, hidden: int, inter: int, seed: int,
             shared: bool = False):
    """fp32 operands; ``shared``: every token routed to the same experts (in another order)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    tw = torch.rand(tokens, top_k, generator=g)
    if shared:
        base = torch.randperm(experts, generator=g)[:top_k]
        ids = torch.stack([base.roll(t) for t in range(tokens)])
    else:
        ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return x, w13, w2, tw, ids.to(torch.int32)


# (tokens, experts, top_k, hidden, inter, shared): the CPU tiles are 16x32 (gate-up) and
# 8x32 (down), so 64/32 runs unmasked, 72/40 and 96/48 mask both kernels, k=3 masks a slot
CASES = [(1, 8, 2, 64, 32, False), (3, 16, 4, 72, 40, False), (5, 8, 3, 96, 48, True),
         (2, 12, 3, 128, 96, False)]


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,shared", CASES)
def test_decode_moe_matches_float64(device: torch.device, tokens: int, experts: int,
                                    top_k: int, hidden: int, inter: int, shared: bool) -> None:
    x, w13, w2, tw, ids = _problem(tokens, experts, top_k, hidden, inter, tokens + hidden,
                                   shared)
    dev = [t.to(device) for t in (x, w13, w2, tw, ids)]
    out = moe.fused_moe(*dev)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, _moe_ref(x, w13, w2, tw, ids)) < 1e-5


def test_decode_moe_strided_inputs_int64_ids_and_odd_tiles(device: torch.device) -> None:
    """Non-contiguous routing tensors, int64 ids, one output per down program, and tiles
    wider than K (a single masked K step)."""
    x, w13, w2, tw, ids = _problem(3, 10, 4, 24, 24, 7)
    ids_t = ids.long().t().contiguous().t()  # same values, column-major
    tw_t = tw.t().contiguous().t()
    for cfg in (DecodeConfig(DecodeTile(4, 64, 1), DecodeTile(1, 32, 1)),
                DecodeConfig(DecodeTile(4, 64, 1, fold=8), DecodeTile(1, 32, 1, fold=8))):
        out = decode_moe(x.to(device), w13.to(device), w2.to(device), tw_t.to(device),
                         ids_t.to(device), cfg)
        assert rel_err(out, _moe_ref(x, w13, w2, tw, ids)) < 1e-5


def test_decode_moe_reads_routing_rows_of_any_stride(device: torch.device) -> None:
    """Weights and ids as the two halves of one int32 tensor (DeepSeek's shared-expert
    slots): row strides of twice their width, read in place."""
    x, w13, w2, tw, ids = _problem(3, 10, 4, 64, 32, 11)
    both = torch.cat([tw.view(torch.int32), ids], dim=1).to(device)
    tw_v, ids_v = both[:, :4].view(torch.float32), both[:, 4:]
    assert tw_v.stride(0) == 8 and ids_v.stride(0) == 8
    out = decode_moe(x.to(device), w13.to(device), w2.to(device), tw_v, ids_v)
    assert rel_err(out, _moe_ref(x, w13, w2, tw, ids)) < 1e-5


def test_fused_moe_takes_the_decode_path_up_to_the_threshold(
        device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return decode_moe(x, *args, **kwargs)

    monkeypatch.setattr(moe, "decode_moe", spy)
    top_k = 4
    small = MAX_DECODE_PAIRS // top_k
    for tokens in (1, small, small + 1):
        x, w13, w2, tw, ids = _problem(tokens, 16, top_k, 16, 16, tokens)
        out = moe.fused_moe(*(t.to(device) for t in (x, w13, w2, tw, ids)))
        assert rel_err(out, _moe_ref(x, w13, w2, tw, ids)) < 1e-5
    assert calls == [1, small]  # small + 1 tokens took the grouped GEMM


def test_gpu_tiles_for_the_target_models() -> None:
    """The H200 (132 SMs) launch shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite experts:
    enough programs, 8 KiB of gate/up and 4 KiB of down weights per load (the shapes the
    H200 sweep found fastest), exact K loops where possible."""
    for tokens in (1, 8):
        for top_k, hidden, inter in ((8, 2048, 768), (6, 2048, 1408)):
            cfg = choose_tiles(tokens, top_k, hidden, inter, 2, 132)
            g, d = cfg.gate_up, cfg.down
            assert tokens * top_k * (inter // g.block_n) >= 4 * 132
            assert tokens * (hidden // d.block_n) >= 4 * 132
            assert hidden % g.block_k == 0
            assert 2 * g.block_n * g.block_k * 2 == 8 * 1024
            assert 8 * d.block_n * d.block_k * 2 == 4 * 1024
    assert choose_tiles(1, 8, 2048, 768, 2, 132).down.block_k == 128  # 768 = 6 x 128, exact
    assert choose_tiles(1, 6, 2048, 1408, 2, 132).down.block_k == 128  # 1408 = 11 x 128
    assert choose_tiles(1, 6, 2048, 1400, 2, 132).down.block_k == 128  # masked last step
    assert choose_tiles(1, 6, 2048, 1472, 2, 132).down.block_k == 64  # 1472 = 23 x 64
    assert choose_tiles(1, 16, 64, 64, 4, 132).down.block_n == 1
    assert choose_tiles(1, 1, 64, 64, 4, 132).down.block_k == 64  # no wider than K


@pytest.mark.parametrize("routed,top_k,shared", [(8, 6, 2), (8, 8, 1)], ids=["v2", "v3"])
def test_deepseek_shared_experts_appended_to_the_top_k_take_the_decode_path(
        device: torch.device, monkeypatch: pytest.MonkeyPatch, routed: int, top_k: int,
        shared: int) -> None:
    """DeepSeek's fused shared experts (``core/models/deepseek.py``): ids ``E..E+n-1`` with
    weight 1.0 appended to each token's routed top-k; V2-Lite's 6 + 2 = 8 pairs a token
    (and V3's 8 + 1 = 9) take the two-launch decode path at batch 1 and up to
    ``MAX_DECODE_PAIRS`` pairs, and equal routed + shared computed apart."""
    calls: list[int] = []

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return decode_moe(x, *args, **kwargs)

    monkeypatch.setattr(moe, "decode_moe", spy)
    k = top_k + shared
    for tokens in (1, MAX_DECODE_PAIRS // k):
        x, w13, w2, tw, ids = _problem(tokens, routed + shared, top_k, 64, 32, tokens)
        ids = ids % routed  # routed ids only in [0, E)
        tw_all = torch.cat([tw, torch.ones(tokens, shared)], dim=1)
        ids_all = torch.cat([ids, torch.arange(routed, routed + shared, dtype=torch.int32)
                             .expand(tokens, shared)], dim=1)
        out = moe.fused_moe(*(t.to(device) for t in (x, w13, w2, tw_all, ids_all)))
        apart = _moe_ref(x, w13, w2, tw, ids) + _moe_ref(
            x, w13, w2, torch.ones(tokens, shared), ids_all[:, top_k:])
        assert rel_err(out, apart) < 1e-5
    assert calls == [1, MAX_DECODE_PAIRS // k]
    # the H200 tiles: V2-Lite's down kernel keeps BLOCK_E = 8 (6 routed slots were padded
    # to 8 before), V3's fp8 experts keep block_n dividing the 128-row scale blocks
    assert choose_tiles(1, 8, 2048, 1408, 2, 132) == choose_tiles(1, 6, 2048, 1408, 2, 132)
    v3 = choose_tiles(1, 9, 7168, 2048, 1, 132)
    assert 128 % v3.gate_up.block_n == 0 and 128 % v3.down.block_n == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_moe_graph_capture_bf16() -> None:
    dev = torch.device("cuda")
    x, w13, w2, tw, ids = _problem(4, 16, 6, 2048, 1408, 3)
    x, w13, w2 = (t.to(dev, torch.bfloat16) for t in (x, w13, w2))
    tw, ids = tw.to(dev), ids.to(dev)
    ref = _moe_ref(x, w13, w2, tw, ids)
    moe.fused_moe(x, w13, w2, tw, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, w13, w2, tw, ids)
    ids.copy_(ids.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, _moe_ref(x, w13, w2, tw, ids)) < 1e-2
    assert rel_err(out, ref) > 1e-2  # the replay read the new ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decode_layers_chained_in_a_graph() -> None:
    """Router -> top-k softmax -> both decode kernels, three layers in one graph: every kernel
    reads what the one just before wrote (with PDL, the waits must hold), and the down kernel's
    early loads of ids and routing weights see the router's current output."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator().manual_seed(5)
    layers = [(torch.randn(512, 32, generator=g).to(dev),
               (torch.randn(32, 2 * 256, 512, generator=g) / 512 ** 0.5).to(dev, dt),
               (torch.randn(32, 512, 256, generator=g) / 256 ** 0.5).to(dev, dt))
              for _ in range(3)]
    x0 = torch.randn(2, 512, generator=g).to(dev, dt)

    def forward(x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        seen = []
        for gate, w13, w2 in layers:
            tw, ids = moe.topk_softmax(x.float() @ gate, 8, True)
            seen.append((x, tw, ids))
            x = moe.fused_moe(x, w13, w2, tw, ids)
        return seen + [(x,)]

    forward(x0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen = forward(x0)
    x0.copy_(torch.randn(2, 512, generator=g).to(dev, dt))
    graph.replay()
    torch.cuda.synchronize()
    for n, (gate, w13, w2) in enumerate(layers):
        x, tw, ids = seen[n]
        ref_tw, ref_ids = torch.softmax(x.double() @ gate.double(), -1).topk(8, dim=-1)
        assert torch.equal(ids.sort(-1).values.long(), ref_ids.sort(-1).values)
        assert rel_err(tw, ref_tw / ref_tw.sum(-1, keepdim=True)) < 1e-4
        assert rel_err(seen[n + 1][0], _moe_ref(x, w13, w2, tw, ids)) < 1e-2


def test_kernels_compile_for_hopper_with_wide_loads_and_pdl() -> None:
    """The compiled (not interpreted) kernels at the H200 launch shapes of both target models
    build for sm_90a, load weights in 16-byte vectors on the unmasked and masked paths, and
    wait with ``griddepcontrol`` (PDL). Runs the Triton compiler in a child process without
    the interpreter; no GPU needed."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    ptrs = ["x_ptr", "w_ptr", "ws_ptr", "ids_ptr", "inter_ptr", "route_ptr", "out_ptr"]
    ints = ["N", "K", "stride_xm", "stride_we", "stride_wn", "stride_se", "stride_om"]
    jobs = []
    # bf16 experts, then fp8_block experts (1-byte weights, fp32 block scales)
    for w_type, elem_bytes in (("*bf16", 2), ("*fp8e4nv", 1)):
        scaled = elem_bytes == 1
        gate_sig = {"x_ptr": "*bf16", "w_ptr": w_type, "ws_ptr": "*fp32", "ids_ptr": "*i32",
                    "inter_ptr": "*fp32",
                    **dict.fromkeys(["N", "K", "num_pairs", "top_k", "stride_xm", "stride_we",
                                     "stride_wn", "stride_se", "stride_sn", "stride_it"],
                                    "i32"),
                    **dict.fromkeys(["EVEN", "BLOCK_N", "BLOCK_K", "USE_PDL", "W_SCALED",
                                     "SCALE_BLOCK", "FOLD"], "constexpr")}
        down_sig = {"inter_ptr": "*fp32", "w_ptr": w_type, "ws_ptr": "*fp32",
                    "ids_ptr": "*i32", "route_ptr": "*fp32", "out_ptr": "*bf16",
                    **dict.fromkeys(["N", "K", "num_tokens", "stride_we", "stride_wn",
                                     "stride_se", "stride_sn", "stride_om", "stride_it",
                                     "stride_rt"], "i32"),
                    **dict.fromkeys(["TOP_K", "BLOCK_E", "EVEN", "BLOCK_N", "BLOCK_K",
                                     "USE_PDL", "W_SCALED", "SCALE_BLOCK", "FOLD"],
                                    "constexpr")}
        for top_k, hidden, inter in ((8, 2048, 768), (6, 2048, 1408)):
            if scaled and inter % 128:
                continue  # fp8_block experts need I % 128 == 0 (1408 = 11 * 128 passes)
            cfg = choose_tiles(1, top_k, hidden, inter, elem_bytes, 132)
            g, d = cfg.gate_up, cfg.down
            jobs.append({"kernel": "_gate_up_kernel", "signature": gate_sig,
                         "constexprs": {"EVEN": inter % g.block_n == 0 and
                                        hidden % g.block_k == 0,
                                        "BLOCK_N": g.block_n, "BLOCK_K": g.block_k,
                                        "USE_PDL": True, "W_SCALED": scaled,
                                        "SCALE_BLOCK": 128, "FOLD": g.fold},
                         "num_warps": g.num_warps})
            jobs.append({"kernel": "_down_kernel", "signature": down_sig,
                         "constexprs": {"TOP_K": top_k, "BLOCK_E": 8,
                                        "EVEN": hidden % d.block_n == 0 and
                                        inter % d.block_k == 0,
                                        "BLOCK_N": d.block_n, "BLOCK_K": d.block_k,
                                        "USE_PDL": True, "W_SCALED": scaled,
                                        "SCALE_BLOCK": 128, "FOLD": d.fold},
                         "num_warps": d.num_warps})
    assert all(j["constexprs"]["EVEN"] for j in jobs)  # the default tiles divide K
    fp8_jobs = jobs[-2:]
    for job in fp8_jobs:  # and K steps inside one scale block (one scale per tile)
        jobs.append({**job, "constexprs": {**job["constexprs"], "BLOCK_K": 64,
                                           "EVEN": False}})
    for job in fp8_jobs:  # and each 16-byte load's products folded first
        jobs.append({**job, "constexprs": {**job["constexprs"], "FOLD": 16}})
    for job in jobs:
        job.update(module="heteroserve.platforms.triton.moe_decode", aligned=ptrs + ints)
    for job, res in zip(jobs, hopper_ptx(jobs), strict=True):
        assert res["griddepcontrol_wait"], job["kernel"]
        if job["constexprs"]["BLOCK_K"] >= 128:  # the narrow fp8 tiles only need to build
            # 16-byte vector loads: 64 B of gate/up or 32 B of down weights per thread a step
            want = 4 if job["kernel"] == "_gate_up_kernel" else 2
            assert res["v4_loads"] >= want, (job["kernel"], res)
