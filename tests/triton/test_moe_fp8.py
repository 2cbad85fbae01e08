"""Triton fused MoE with fp8_block experts (weight-only, 128x128 block scales) against
float64 on the dequantized weights, on both paths (decode GEMV pair, grouped GEMM).

The interpreter has no fp8: the kernels are generic over the weight dtype (load, convert,
scale), so these tests store the fp8 grid's values in fp32 ("stand-ins") and pass real block
scales; on a GPU the same values also run as float8_e4m3fn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_refs import rel_err

from heteroserve.core.kernels.ops import MOE_WEIGHT_SCHEMES_ATTR, MoEWeightQuant
from heteroserve.platforms.triton import moe
from heteroserve.platforms.triton.moe_decode import MAX_DECODE_PAIRS

HAS_GPU = torch.cuda.is_available()


def _blocks(n: int) -> int:
    return -(-n // 128)


def _expand(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return scale.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :k]


def _problem(tokens: int, experts: int, top_k: int, hidden: int, inter: int, seed: int):
    """fp8-grid weights (as fp32) with fp32 block scales of very different sizes, so that
    a scale applied to the wrong block shows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)

    def weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values = (torch.randn(experts, n, k, generator=g) * 64).clamp(-448, 448)
        values = values.to(torch.float8_e4m3fn).to(torch.float32)
        scale = torch.rand(experts, _blocks(n), _blocks(k), generator=g) * 4 + 0.25
        return values, scale / (64 * k ** 0.5)

    w13, s13 = weight(2 * inter, hidden)
    w2, s2 = weight(hidden, inter)
    tw = torch.rand(tokens, top_k, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return x, w13, s13, w2, s2, tw, ids.to(torch.int32)


def _ref(x, w13, s13, w2, s2, tw, ids) -> torch.Tensor:
    w13 = w13.double() * _expand(s13.double(), w13.shape[1], w13.shape[2])
    w2 = w2.double() * _expand(s2.double(), w2.shape[1], w2.shape[2])
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t].double()
            out[t] += tw[t, j].double() * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


# (tokens, experts, top_k, hidden, inter): H=200 has a ragged last block column (w13) and
# block row (w2); I=256 puts the up half in block rows 2-3; 40 x 2 pairs pass the decode limit
CASES = [(1, 4, 2, 128, 128), (3, 6, 3, 200, 128), (2, 3, 2, 96, 256), (40, 4, 2, 200, 128)]


@pytest.mark.parametrize("path", ["fused_moe", "grouped_moe"])
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", CASES)
def test_fp8_block_experts_match_float64(device: torch.device, path: str, tokens: int,
                                         experts: int, top_k: int, hidden: int,
                                         inter: int) -> None:
    """``fused_moe`` (decode path up to 64 pairs, grouped GEMM above) and the grouped GEMM
    forced, with fp32 stand-ins for the fp8 values."""
    if path == "grouped_moe" and tokens * top_k > MAX_DECODE_PAIRS:
        pytest.skip("fused_moe already takes the grouped GEMM here")
    x, w13, s13, w2, s2, tw, ids = _problem(tokens, experts, top_k, hidden, inter,
                                            tokens * 31 + hidden)
    quant = MoEWeightQuant("fp8_block", s13.to(device), s2.to(device))
    out = getattr(moe, path)(x.to(device), w13.to(device), w2.to(device), tw.to(device),
                             ids.to(device), quant)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, _ref(x, w13, s13, w2, s2, tw, ids)) < 1e-5


@pytest.mark.parametrize("gate_up,down,fold", [((16, 256), (8, 256), 1), ((4, 512), (2, 128), 1),
                                               ((8, 64), (16, 512), 1), ((8, 256), (2, 128), 16)])
def test_decode_tiles_across_scale_blocks(device: torch.device, gate_up: tuple[int, int],
                                          down: tuple[int, int], fold: int) -> None:
    """K steps wider than a scale block (each group's scale loaded once and repeated, the last
    group ragged: H = 200) and narrower (one scale per tile), on both decode kernels; with
    ``fold`` 16 the accumulators sum 16 adjacent columns first."""
    from heteroserve.platforms.triton.moe_decode import DecodeConfig, DecodeTile, decode_moe

    x, w13, s13, w2, s2, tw, ids = _problem(3, 5, 2, 200, 256, 11)
    cfg = DecodeConfig(DecodeTile(*gate_up, 1, fold=fold), DecodeTile(*down, 1, fold=fold))
    out = decode_moe(x.to(device), w13.to(device), w2.to(device), tw.to(device),
                     ids.to(device), cfg, scales=(s13.to(device), s2.to(device)))
    assert rel_err(out, _ref(x, w13, s13, w2, s2, tw, ids)) < 1e-5


def test_fused_moe_declares_fp8_block_and_w4a16() -> None:
    assert getattr(moe.fused_moe, MOE_WEIGHT_SCHEMES_ATTR) == ("fp8_block", "w4a16")


@pytest.mark.parametrize("what", ["scheme", "w13_scale", "w2_scale", "inter"])
def test_bad_quant_is_refused(device: torch.device, what: str) -> None:
    inter = 96 if what == "inter" else 128
    x, w13, s13, w2, s2, tw, ids = _problem(2, 4, 2, 128, inter, 0)
    if what == "w13_scale":
        s13 = s13[:, :1]
    elif what == "w2_scale":
        s2 = torch.cat([s2, s2], dim=2)
    quant = MoEWeightQuant("fp8_x" if what == "scheme" else "fp8_block", s13, s2)
    with pytest.raises(ValueError, match="fp8_block, w4a16" if what == "scheme" else "scales"):
        moe.fused_moe(*(t.to(device) for t in (x, w13, w2, tw, ids)),
                      MoEWeightQuant(quant.scheme, s13.to(device), s2.to(device)))


@pytest.mark.skipif(not HAS_GPU, reason="float8_e4m3fn tensors need a GPU (no fp8 in the "
                                        "interpreter)")
@pytest.mark.parametrize("tokens", [3, 40])
def test_real_fp8_weights_bf16_activations(tokens: int) -> None:
    x, w13, s13, w2, s2, tw, ids = _problem(tokens, 8, 2, 256, 256, tokens)
    dev = torch.device("cuda")
    quant = MoEWeightQuant("fp8_block", s13.to(dev), s2.to(dev))
    out = moe.fused_moe(x.to(dev, torch.bfloat16), w13.to(dev, torch.float8_e4m3fn),
                        w2.to(dev, torch.float8_e4m3fn), tw.to(dev), ids.to(dev), quant)
    ref = _ref(x.to(torch.bfloat16).float(), w13, s13, w2, s2, tw, ids)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2


def test_grouped_gemm_compiles_for_hopper_with_fp8_weights() -> None:
    """The compiled (not interpreted) grouped GEMM with float8_e4m3fn weights and block
    scales builds for sm_90a at the GPU tile choices, gated and not (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from ptx_check import hopper_ptx
    from heteroserve.platforms.triton.moe_gemm import moe_configs

    names = ["a_ptr", "w_ptr", "ws_ptr", "c_ptr", "sorted_ids_ptr", "block_experts_ptr",
             "num_rows_ptr", "route_w_ptr"]
    ints = ["N", "K", "num_pairs", "stride_am", "stride_we", "stride_wn", "stride_se",
            "stride_sn", "stride_cm"]
    consts = ["A_ROW_DIV", "GATED", "MUL_WEIGHT", "EXACT_FP32", "W_SCALED", "SCALE_BLOCK",
              "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"]
    jobs = []
    for pairs in (128, 8192):  # few rows per expert, many
        for gated, cfg in zip((True, False), moe_configs(pairs, 128, torch.bfloat16,
                                                         torch.device("cuda"))):
            sig = dict(zip(names, ["*bf16", "*fp8e4nv", "*fp32", "*bf16", "*i32", "*i32",
                                   "*i32", "*fp32"]))
            sig.update(dict.fromkeys(ints, "i32"))
            sig.update(dict.fromkeys(consts, "constexpr"))
            bm, bn, bk, warps, _ = cfg
            jobs.append({"module": "heteroserve.platforms.triton.moe_gemm",
                         "kernel": "_moe_gemm_kernel", "signature": sig,
                         "constexprs": {"A_ROW_DIV": 8 if gated else 1, "GATED": gated,
                                        "MUL_WEIGHT": not gated, "EXACT_FP32": False,
                                        "W_SCALED": True, "SCALE_BLOCK": 128, "BLOCK_M": bm,
                                        "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         "aligned": names + ints, "num_warps": warps})
    results = hopper_ptx(jobs)
    assert len(results) == 4 and all(r["ptx_lines"] > 100 for r in results)
