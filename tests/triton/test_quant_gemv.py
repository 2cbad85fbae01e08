"""The decode GEMVs of the quantized schemes against the float64 oracles of conformance:
W8A8 (fp8 per-tensor / per-channel / 128x128 block, int8 per-channel) with the activation
quantized in-kernel, and W4A16 (AWQ, GPTQ) unpacking nibbles in registers; ragged K and N,
1 to 4 rows, bias; and the linear methods sending few rows to them. The fp8 weights load in
the interpreter (fp8 -> fp32 is exact there); the kernel's fp8 rounding of the activation is
integer arithmetic, checked here against torch's cast on every fp8 value and its midpoints."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton_refs import rel_err

from heteroserve.conformance import quantize
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.core.kernels.linear import LinearShape
from heteroserve.platforms.triton import w8_gemv as w8

FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@triton.jit
def _round_kernel(v_ptr, o_ptr, n, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n, other=0.0)
    tl.store(o_ptr + offs, w8.round_fp8(v, MIN_NORMAL, SUB_MAGIC), mask=offs < n)


@pytest.mark.parametrize("fp8", FP8)
def test_round_fp8_matches_torch_cast(device: torch.device, fp8: torch.dtype) -> None:
    """Every finite fp8 value, the midpoints between neighbours (ties to even) and points
    just either side of them round as torch's round-to-nearest-even cast does."""
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[grid.isfinite()].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, mid, mid * (1 + 2**-20), mid * (1 - 2**-20),
                   torch.randn(4000, generator=_gen(0)) * 50]).clamp(-grid.max(), grid.max())
    out = torch.empty_like(v)
    smallest, magic = w8._fp8_constants(fp8)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v.to(device), out_dev := out.to(device),
                                                   v.numel(), MIN_NORMAL=smallest,
                                                   SUB_MAGIC=magic, BLOCK=1024)
    assert torch.equal(out_dev.cpu(), v.to(fp8).float())


_W8 = {
    "fp8_per_tensor": (quantize.quantize_fp8_per_tensor, w8.ACT_TENSOR, w8.WS_TENSOR,
                       "weight_scale"),
    "fp8_per_channel": (quantize.quantize_fp8_per_channel, w8.ACT_ROW, w8.WS_CHANNEL,
                        "weight_scale"),
    "fp8_block": (quantize.quantize_fp8_block, w8.ACT_GROUP, w8.WS_BLOCK, "weight_scale_inv"),
    "int8_w8a8": (lambda w, _dt: quantize.quantize_int8_per_channel(w), w8.ACT_ROW,
                  w8.WS_CHANNEL, "weight_scale"),
}


def _activations(gen: torch.Generator, rows: int, k: int, scheme: str,
                 fp8: torch.dtype) -> torch.Tensor:
    return quantize.w8a8_activations(gen, rows, k, scheme, torch.float32,
                                     None if scheme == "int8_w8a8" else fp8)


@pytest.mark.parametrize("scheme", list(_W8))
@pytest.mark.parametrize("rows,k,n,bias", [(1, 320, 200, True), (3, 256, 256, False),
                                           (4, 200, 130, False)])
def test_w8_gemv_against_float64(device: torch.device, scheme: str, rows: int, k: int,
                                 n: int, bias: bool) -> None:
    """fp32 activations, so the only error is fp32 accumulation: ragged K (not a multiple
    of 128) and N (not of the tile), the even path (256 x 256), several rows."""
    make, act, ws, scale_name = _W8[scheme]
    fp8 = torch.float8_e4m3fn
    g = _gen(rows * 1000 + k + n)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    ckpt = make(w, fp8)
    x = _activations(g, rows, k, scheme, fp8)
    b = torch.randn(n, generator=g) if bias else None
    scale = ckpt[scale_name].float()
    scale = scale.reshape(-1) if ws != w8.WS_BLOCK else scale.contiguous()
    qmax = 127.0 if scheme == "int8_w8a8" else 448.0
    out = w8.w8_gemv(x.to(device), ckpt["weight"].to(device), scale.to(device), act, ws, qmax,
                     torch.float32, b.to(device) if b is not None else None)
    ref = oracle.linear(scheme, x, ckpt, 128, b, fp8)
    assert out.shape == (rows, n) and rel_err(out, ref) < 2e-6


def test_w8_gemv_fnuz_block(device: torch.device) -> None:
    """e4m3fnuz weights (max 240, one more binade of subnormals) quantize x onto their grid."""
    fp8 = torch.float8_e4m3fnuz
    g = _gen(7)
    w = torch.randn(136, 384, generator=g, dtype=torch.float64) / 20
    ckpt = quantize.quantize_fp8_block(w, fp8)
    x = quantize.w8a8_activations(g, 2, 384, "fp8_block", torch.float32, fp8)
    out = w8.w8_gemv(x.to(device), ckpt["weight"].to(device),
                     ckpt["weight_scale_inv"].to(device), w8.ACT_GROUP, w8.WS_BLOCK, 240.0,
                     torch.float32)
    assert rel_err(out, oracle.linear("fp8_block", x, ckpt, 128, None, fp8)) < 2e-6


def test_w8_gemv_quantizes_the_activation(device: torch.device) -> None:
    """Not a bf16-activation GEMV in disguise: a row with one large outlier loses the small
    values to fp8 rounding exactly as the oracle says, far from the unquantized product."""
    fp8 = torch.float8_e4m3fn
    k, n = 256, 32
    w = torch.randn(n, k, generator=_gen(3), dtype=torch.float64)
    w[:, 0] = 0  # the outlier only sets the scale
    ckpt = quantize.quantize_fp8_per_channel(w, fp8)
    x = torch.full((1, k), 0.01)
    x[0, 0] = 448.0 * 4  # scale 4: 0.01 / 4 rounds to 2**-9, 0.0078 after scaling
    out = w8.w8_gemv(x.to(device), ckpt["weight"].to(device),
                     ckpt["weight_scale"].reshape(-1).to(device), w8.ACT_ROW, w8.WS_CHANNEL,
                     448.0, torch.float32)
    ref = oracle.linear("fp8_per_channel", x, ckpt, 128, None, fp8)
    plain = x.double() @ oracle.dequantize("fp8_per_channel", ckpt, 128).T
    assert rel_err(out, ref) < 1e-6 and rel_err(plain.float(), ref) > 0.1


def test_w8_gemv_rejects_bad_shapes(device: torch.device) -> None:
    x = torch.randn(1, 64, device=device)
    w = torch.zeros(32, 64, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="agree on K"):
        w8.w8_gemv(x[:, :32], w, torch.ones(32, device=device), w8.ACT_ROW, w8.WS_CHANNEL,
                   127.0, torch.float32)
    with pytest.raises(ValueError, match="weight scale"):
        w8.w8_gemv(x, w, torch.ones(31, device=device), w8.ACT_ROW, w8.WS_CHANNEL, 127.0,
                   torch.float32)
