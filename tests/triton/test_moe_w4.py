"""The 4-bit weight-only expert paths of ``moe_w4.py``: the two-launch decode MoE against a
float64 reference built from the scheme's meaning (``dequantize_w4_experts``), the grouped
4-bit GEMM of ``moe_gemm_w4.py`` likewise, the GPU tile heuristic, and the Hopper builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ptx_check import hopper_ptx
from triton_refs import rel_err

from heteroserve.core.kernels.ops import MoEWeightQuant, dequantize_w4_experts
from heteroserve.core.quantization import nibbles
from heteroserve.platforms.triton.moe_w4 import (
    W4DecodeConfig, W4Tile, choose_w4_tiles, decode_moe_w4,
)


def _experts(e: int, rows: int, k: int, group: int, g: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random words ``[e, rows, k // 8]``, fp32 scales and int8 zeros ``[e, rows, k // group]``."""
    q = nibbles.pack(torch.randint(0, 16, (e, rows, k), generator=g), -1)
    scale = torch.rand(e, rows, k // group, generator=g) * 0.04 + 0.01
    zero = torch.randint(0, 16, (e, rows, k // group), generator=g).to(torch.int8)
    return q, scale, zero


def _problem(tokens: int, experts: int, top_k: int, hidden: int, inter: int, group: int,
             seed: int):
    """fp32 ``x``, words ``w13`` / ``w2``, their ``MoEWeightQuant``, routing weights and
    int32 ids (distinct experts per token)."""
    g = torch.Generator().manual_seed(seed)
    w13, s13, z13 = _experts(experts, 2 * inter, hidden, group, g)
    w2, s2, z2 = _experts(experts, hidden, inter, group, g)
    quant = MoEWeightQuant("w4a16", s13, s2, z13, z2, group)
    x = torch.randn(tokens, hidden, generator=g)
    tw = torch.rand(tokens, top_k, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return x, w13, w2, quant, tw, ids.to(torch.int32)


def _on(quant: MoEWeightQuant, device: torch.device) -> MoEWeightQuant:
    return MoEWeightQuant("w4a16", quant.w13_scale.to(device), quant.w2_scale.to(device),
                          quant.w13_zero.to(device), quant.w2_zero.to(device), quant.group_size)


def _reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, quant: MoEWeightQuant,
               tw: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float64 ``sum_j tw[t, j] * W2[e] @ (silu(gate) * up)`` of the dequantized experts."""
    g = quant.group_size
    dense13 = dequantize_w4_experts(w13, quant.w13_scale, quant.w13_zero, g).double()
    dense2 = dequantize_w4_experts(w2, quant.w2_scale, quant.w2_zero, g).double()
    x, tw = x.double(), tw.double()
    inter = dense2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = dense13[e] @ x[t]
            out[t] += tw[t, j] * (dense2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def _run(device: torch.device, x, w13, w2, quant, tw, ids, config=None) -> torch.Tensor:
    return decode_moe_w4(x.to(device), w13.to(device), w2.to(device), tw.to(device),
                         ids.to(device), _on(quant, device), config)


# (tokens, experts, top_k, hidden, inter, group): the CPU tiles are 16 rows x 8 words
# (gate-up) and 8 rows x 4 words (down): I = 48 and H = 96 leave ragged K steps, k = 3
# masks a slot, G = 8 / 16 / 32 gives several groups a step, one, and steps inside one;
# G = 24 (3 words) takes one-word steps
CASES = [(1, 4, 1, 64, 32, 32), (3, 6, 2, 96, 48, 16), (5, 8, 3, 64, 48, 8),
         (2, 6, 4, 96, 32, 32), (2, 5, 2, 48, 48, 24)]


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,group", CASES)
def test_decode_moe_w4_matches_float64(device: torch.device, tokens: int, experts: int,
                                       top_k: int, hidden: int, inter: int,
                                       group: int) -> None:
    x, w13, w2, quant, tw, ids = _problem(tokens, experts, top_k, hidden, inter, group,
                                          tokens * 100 + hidden + group)
    out = _run(device, x, w13, w2, quant, tw, ids)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert rel_err(out, _reference(x, w13, w2, quant, tw, ids)) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_decode_moe_w4_16_bit_activations(device: torch.device, dtype: torch.dtype,
                                          tol: float) -> None:
    """16-bit ``x`` (the reference reads the same rounded values): only the output's single
    rounding to ``x.dtype`` separates the two."""
    x, w13, w2, quant, tw, ids = _problem(3, 6, 2, 64, 32, 16, 5)
    x = x.to(dtype)
    out = _run(device, x, w13, w2, quant, tw, ids)
    assert out.dtype == dtype
    assert rel_err(out, _reference(x, w13, w2, quant, tw, ids)) < tol


def test_decode_moe_w4_strided_routing_int64_ids_and_ragged_tiles(
        device: torch.device) -> None:
    """Column-major int64 ids and weights, then both as halves of one int32 tensor (rows of
    twice their width, read in place); tiles whose ``block_n`` divides neither ``I`` nor
    ``H`` and whose K steps cover several groups with a masked tail."""
    x, w13, w2, quant, tw, ids = _problem(3, 7, 3, 96, 48, 8, 9)
    ref = _reference(x, w13, w2, quant, tw, ids)
    ragged = W4DecodeConfig(W4Tile(32, 8, 1), W4Tile(64, 4, 1))  # 48 % 32, 96 % 64, 12 % 8
    ids_t, tw_t = ids.long().t().contiguous().t(), tw.t().contiguous().t()
    assert ids_t.stride() == (1, 3)
    for cfg in (None, ragged):
        assert rel_err(_run(device, x, w13, w2, quant, tw_t, ids_t, cfg), ref) < 1e-5
    both = torch.cat([tw.view(torch.int32), ids], dim=1).to(device)
    tw_v, ids_v = both[:, :3].view(torch.float32), both[:, 3:]
    assert tw_v.stride(0) == 6 and ids_v.stride(0) == 6
    out = decode_moe_w4(x.to(device), w13.to(device), w2.to(device), tw_v, ids_v,
                        _on(quant, device), ragged)
    assert rel_err(out, ref) < 1e-5


def test_decode_moe_w4_rejects_bad_shapes_and_tiles(device: torch.device) -> None:
    x, w13, w2, quant, tw, ids = _problem(1, 4, 2, 64, 32, 16, 3)
    bad_scale = MoEWeightQuant("w4a16", quant.w13_scale[:, :, :-1], quant.w2_scale,
                               quant.w13_zero, quant.w2_zero, 16)
    with pytest.raises(ValueError):
        decode_moe_w4(x, w13, w2, tw, ids, bad_scale)
    bad_zero = MoEWeightQuant("w4a16", quant.w13_scale, quant.w2_scale,
                              quant.w13_zero.float(), quant.w2_zero, 16)
    with pytest.raises(ValueError):
        decode_moe_w4(x, w13, w2, tw, ids, bad_zero)
    with pytest.raises(ValueError):  # x of the wrong width
        decode_moe_w4(x[:, :32], w13, w2, tw, ids, quant)
    with pytest.raises(ValueError):  # 8 words a step over groups of 2 words is fine; 3 is not
        decode_moe_w4(x, w13, w2, tw, ids, quant,
                      W4DecodeConfig(W4Tile(16, 3, 1), W4Tile(8, 4, 1)))


def test_gpu_tiles_heuristic() -> None:
    """H200 (132 SMs) shapes of Qwen3-30B-A3B (H 2048, I 768) and DeepSeek-V2-Lite (I 1408)
    experts at group 128: 64-word steps (halved where that makes K exact), enough
    programs, 16 weight rows a gate-up program and 32 a down program (the H100 sweep's
    best, 4 outputs x 8 slots); a 3-word group forces one-word steps."""
    for tokens in (1, 8):
        for top_k, hidden, inter in ((8, 2048, 768), (6, 2048, 1408)):
            cfg = choose_w4_tiles(tokens, top_k, hidden, inter, 128, 132)
            g, d = cfg.gate_up, cfg.down
            assert g.block_kw == 64 and d.block_kw in (32, 64)
            assert tokens * top_k * (inter // g.block_n) >= 4 * 132
            assert tokens * (hidden // d.block_n) >= 2 * 132
            assert 2 * g.block_n <= 16 and d.block_n == 4
    assert choose_w4_tiles(1, 8, 2048, 768, 128, 132).down.block_kw == 32  # 96 = 3 x 32
    assert choose_w4_tiles(1, 8, 2048, 768, 32, 132).down.block_kw == 32  # 4-word groups
    assert choose_w4_tiles(1, 6, 2048, 1408, 128, 132).down.block_kw == 64  # 176: masked tail
    assert choose_w4_tiles(1, 2, 48, 48, 24, 132).gate_up.block_kw == 1
    assert choose_w4_tiles(1, 1, 64, 64, 64, 132).down.block_kw == 8  # no wider than K


def test_kernels_compile_for_hopper_with_pdl() -> None:
    """The compiled (not interpreted) kernels at the H200 tiles of Qwen3-30B-A3B's experts
    (and a masked, several-groups-a-step variant) build for sm_90a and the decode kernels
    wait with ``griddepcontrol``. Runs the Triton compiler in a child process; no GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    cfg = choose_w4_tiles(1, 8, 2048, 768, 128, 132)
    g, d = cfg.gate_up, cfg.down
    i32 = lambda *names: dict.fromkeys(names, "i32")  # noqa: E731
    const = lambda *names: dict.fromkeys(names, "constexpr")  # noqa: E731
    gate_sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i8",
                "ids_ptr": "*i32", "inter_ptr": "*fp32",
                **i32("N", "KW", "num_pairs", "top_k", "stride_xm", "stride_it", "stride_we",
                      "stride_wn", "stride_se", "stride_sn", "stride_ze", "stride_zn"),
                **const("GROUP_W", "GPS", "MASK_K", "BLOCK_N", "BLOCK_KW", "USE_PDL")}
    down_sig = {"inter_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i8",
                "ids_ptr": "*i32", "route_ptr": "*fp32", "out_ptr": "*bf16",
                **i32("N", "KW", "num_tokens", "stride_it", "stride_rt", "stride_om",
                      "stride_we", "stride_wn", "stride_se", "stride_sn", "stride_ze",
                      "stride_zn"),
                **const("TOP_K", "BLOCK_E", "GROUP_W", "GPS", "MASK_K", "BLOCK_N",
                        "BLOCK_KW", "USE_PDL")}
    jobs = [
        ("_w4_gate_up_kernel", gate_sig, {"GROUP_W": 16, "GPS": 4, "MASK_K": False,
                                          "BLOCK_N": g.block_n, "BLOCK_KW": g.block_kw,
                                          "USE_PDL": True}, g.num_warps),
        ("_w4_down_kernel", down_sig, {"TOP_K": 8, "BLOCK_E": 8, "GROUP_W": 16, "GPS": 2,
                                       "MASK_K": False, "BLOCK_N": d.block_n,
                                       "BLOCK_KW": d.block_kw, "USE_PDL": True},
         d.num_warps),
        ("_w4_down_kernel", down_sig, {"TOP_K": 6, "BLOCK_E": 8, "GROUP_W": 4, "GPS": 8,
                                       "MASK_K": True, "BLOCK_N": 2, "BLOCK_KW": 32,
                                       "USE_PDL": True}, 4),
    ]
    aligned = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "ids_ptr", "inter_ptr", "route_ptr",
               "out_ptr", "KW", "stride_we", "stride_wn", "stride_om", "stride_xm"]
    results = hopper_ptx([{"module": "heteroserve.platforms.triton.moe_w4", "kernel": name,
                           "signature": sig, "constexprs": consts, "aligned": aligned,
                           "num_warps": warps} for name, sig, consts, warps in jobs])
    for (name, *_), res in zip(jobs, results, strict=True):
        assert res["griddepcontrol_wait"], name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_moe_w4_graph_capture_bf16() -> None:
    """Captured once, replayed with new ids: no host sync, and the replay reads them."""
    dev = torch.device("cuda")
    x, w13, w2, quant, tw, ids = _problem(4, 16, 8, 2048, 768, 128, 3)
    x = x.to(dev, torch.bfloat16)
    w13, w2, tw, ids, quant = w13.to(dev), w2.to(dev), tw.to(dev), ids.to(dev), _on(quant, dev)
    ref = _reference(x.cpu(), w13.cpu(), w2.cpu(), _on(quant, torch.device("cpu")), tw.cpu(),
                     ids.cpu())
    decode_moe_w4(x, w13, w2, tw, ids, quant)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_moe_w4(x, w13, w2, tw, ids, quant)
    ids.copy_(ids.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    new_ref = _reference(x.cpu(), w13.cpu(), w2.cpu(), _on(quant, torch.device("cpu")),
                         tw.cpu(), ids.cpu())
    assert rel_err(out, new_ref) < 1e-2
    assert rel_err(out, ref) > 1e-2


@pytest.mark.parametrize("tokens", [3, 40], ids=["decode-6-pairs", "grouped-80-pairs"])
def test_fused_moe_runs_w4a16_experts_on_both_paths(device: torch.device, tokens: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_moe`` with ``w4a16`` experts: up to ``MAX_DECODE_PAIRS`` pairs the 4-bit decode
    kernels, beyond them the 4-bit grouped GEMM; both equal the float64 product of the
    dequantized experts."""
    from heteroserve.platforms.triton import moe

    calls: list[str] = []
    for name in ("decode_moe_w4", "grouped_moe"):
        real = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n),
                                                                          _r(*a, **k))[1])
    x, w13, w2, quant, tw, ids = _problem(tokens, 8, 2, 64, 32, 16, seed=11)
    out = moe.fused_moe(x.to(device), w13.to(device), w2.to(device), tw.to(device),
                        ids.to(device), quant=_on(quant, device))
    assert calls == (["decode_moe_w4"] if tokens * 2 <= moe.MAX_DECODE_PAIRS else ["grouped_moe"])
    assert rel_err(out.cpu(), _reference(x, w13, w2, quant, tw, ids)) < 1e-5


@pytest.mark.parametrize("group", [16, 32])
def test_grouped_w4_gemm_dequantizes_tiles_in_registers(device: torch.device,
                                                         group: int) -> None:
    """80 pairs through ``grouped_moe``: the 4-bit grouped GEMM (a K step of 16 inside a
    group of 16 or 32) equals the float64 product of the dequantized experts; a ``BLOCK_K``
    that does not divide the group is refused."""
    from heteroserve.platforms.triton import moe
    from heteroserve.platforms.triton.moe_align import align_pairs
    from heteroserve.platforms.triton.moe_gemm_w4 import moe_gemm_w4

    x, w13, w2, quant, tw, ids = _problem(40, 8, 2, 64, 32, group, seed=5)
    out = moe.grouped_moe(x.to(device), w13.to(device), w2.to(device), tw.to(device),
                          ids.to(device), _on(quant, device))
    assert rel_err(out.cpu(), _reference(x, w13, w2, quant, tw, ids)) < 1e-5
    pairs = align_pairs(ids.to(device), 8, 16)
    inter = torch.empty(80, 32, device=device)
    with pytest.raises(ValueError, match="BLOCK_K 12"):
        moe_gemm_w4(x.to(device), w13.to(device), quant.w13_scale.to(device),
                    quant.w13_zero.to(device), group, inter, pairs, 2, True, None,
                    (16, 16, 12, 1, 1))


@pytest.mark.parametrize("pairs", [64 * 8, 256 * 8, 1024 * 8, 8192 * 8])
def test_grouped_w4_gemm_builds_for_hopper_without_spills(pairs: int) -> None:
    """The 4-bit grouped GEMM compiles for sm_90a with bf16 activations at the shapes
    ``w4_configs`` picks for Qwen3-30B-A3B's 128 experts and groups of 128, both GEMMs, with
    no register spilled to the stack (the bf16 table's tiles spilled about 1 KB a thread,
    2026-12-06)."""
    from heteroserve.platforms.triton.moe_gemm_w4 import w4_configs

    sig = {"a_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*i8",
           "c_ptr": "*bf16", "sorted_ids_ptr": "*i32", "block_experts_ptr": "*i32",
           "num_rows_ptr": "*i32", "route_w_ptr": "*fp32",
           **{n: "i32" for n in ("N", "K", "num_pairs", "stride_am", "stride_we", "stride_wn",
                                 "stride_se", "stride_sn", "stride_ze", "stride_zn",
                                 "stride_cm")},
           **{n: "constexpr" for n in ("A_ROW_DIV", "GATED", "MUL_WEIGHT", "EXACT_FP32",
                                       "GROUP", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}}
    configs = w4_configs(pairs, 128, 128, torch.device("cuda"))
    jobs = [{"module": "heteroserve.platforms.triton.moe_gemm_w4",
             "kernel": "_moe_gemm_w4_kernel", "signature": sig,
             "constexprs": {"A_ROW_DIV": div, "GATED": gated, "MUL_WEIGHT": not gated,
                            "EXACT_FP32": False, "GROUP": 128, "BLOCK_M": bm, "BLOCK_N": bn,
                            "BLOCK_K": bk, "GROUP_M": 8},
             "aligned": ["a_ptr", "w_ptr", "s_ptr", "z_ptr", "c_ptr", "K", "stride_am",
                         "stride_we", "stride_wn", "stride_cm"], "num_warps": warps,
             "num_stages": stages, "resources": True}
            for (div, gated), (bm, bn, bk, warps, stages) in zip(((8, True), (1, False)),
                                                                  configs)]
    for res in hopper_ptx(jobs):
        assert res["ptx_lines"] > 0 and res["stack"] == 0, res
