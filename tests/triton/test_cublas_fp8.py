"""``platforms/triton/cublas_fp8.py`` against a double of ``torch._scaled_mm``'s block-scaled
fp8 product (no GPU here): the double implements the operand and scale layouts PyTorch checks
(row-major left, column-major right; 1x128 group-major, 128x128 row-major; the right side's
scale checked transposed) and the dequantized product. The activation-first orientation is
the one verified on H100 / H200 hardware (cuda conformance), which anchors the double; the
weight-first one has not run on a GPU."""

from __future__ import annotations

import pytest
import torch

from heteroserve.platforms.triton import cublas_fp8
from heteroserve.platforms.triton.quant import quantize_rows

BLOCK = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kind(t: torch.Tensor, s: torch.Tensor) -> str:
    """'1x128' or '128x128' where ``s`` has that layout for the operand ``t [rows, K]``."""
    rows, groups = t.shape[0], _cdiv(t.shape[1], BLOCK)
    if s.dtype != torch.float32 or s.dim() != 2:
        raise RuntimeError("scales must be 2-D fp32")
    if tuple(s.shape) == (rows, groups) and s.stride(0) == 1 and (groups == 1
                                                                   or s.stride(1) == rows):
        return "1x128"
    if tuple(s.shape) == (_cdiv(rows, BLOCK), groups) and s.stride(1) == 1 and (
            s.shape[0] == 1 or s.stride(0) == groups):
        return "128x128"
    raise RuntimeError(f"no block layout for scale {tuple(s.shape)} {s.stride()}")


def _dequant(t: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    k = t.shape[1]
    per_col = s.repeat_interleave(BLOCK, 1)[:, :k]
    if kind == "128x128":
        per_col = per_col.repeat_interleave(BLOCK, 0)[:t.shape[0]]
    return t.float() * per_col


def fake_scaled_mm(mat1: torch.Tensor, mat2: torch.Tensor, *, scale_a: torch.Tensor,
                   scale_b: torch.Tensor, out_dtype: torch.dtype,
                   use_fast_accum: bool = False, bias=None) -> torch.Tensor:
    if mat1.stride(1) != 1 or mat2.stride(0) != 1:
        raise RuntimeError("only row-major x column-major")
    if mat1.shape[1] % 16 or mat2.shape[0] % 16 or mat2.shape[1] % 16:
        raise RuntimeError("sizes must be multiples of 16")
    right = mat2.t()
    pair = (_kind(mat1, scale_a), _kind(right, scale_b.t()))
    if pair not in {("1x128", "128x128"), ("128x128", "1x128"), ("1x128", "1x128")}:
        raise RuntimeError(f"unsupported pair {pair}")
    if use_fast_accum:  # torch 2.11 on an H100 raised exactly this
        raise RuntimeError("scaled_gemm doesn't support fast accum with 128x128 blockwise "
                           "scaling")
    out = _dequant(mat1, scale_a, pair[0]) @ _dequant(right, scale_b.t(), pair[1]).t()
    return out.to(out_dtype)


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []

    def record(mat1, mat2, **kw):
        calls.append({"mat1": tuple(mat1.shape), "fast": kw.get("use_fast_accum", False)})
        return fake_scaled_mm(mat1, mat2, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", record)
    return calls


def _case(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.float8_e4m3fn)
    ws = torch.rand(n // BLOCK, k // BLOCK, generator=gen) + 0.5
    return x, w, ws


def _reference(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    q, xs = quantize_rows(x, w.dtype, 448.0, BLOCK)
    return _dequant(q, xs, "1x128") @ _dequant(w, ws, "128x128").t()


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("m", [5, 37])
def test_both_orientations_give_the_block_product(double: list[dict], swap: bool,
                                                  m: int) -> None:
    """Ragged row counts (padded to 4 or 16 rows and cut back): the same product, a
    contiguous ``[M, N]``, whichever operand goes first."""
    x, w, ws = _case(m, 256, 512)
    y = cublas_fp8.block_scaled_mm(x, w, ws, 448.0, torch.float32, swap=swap)
    assert y.shape == (m, 256) and y.is_contiguous()
    torch.testing.assert_close(y, _reference(x, w, ws), rtol=1e-5, atol=1e-5)
    assert double[-1]["mat1"] == ((256, 512) if swap else (-(-m // 4) * 4, 512))


def test_swap_follows_the_width_limit(double: list[dict],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, ws = _case(8, 256, 256)
    monkeypatch.setattr(cublas_fp8, "BLOCK_SWAP_MAX_N", 256)
    cublas_fp8.block_scaled_mm(x, w, ws, 448.0, torch.float32)
    assert double[-1]["mat1"] == (256, 256)  # the weight went first
    monkeypatch.setattr(cublas_fp8, "BLOCK_SWAP_MAX_N", 128)
    cublas_fp8.block_scaled_mm(x, w, ws, 448.0, torch.float32)
    assert double[-1]["mat1"] == (8, 256)


def test_fast_accumulation_never_reaches_the_block_product(
        double: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """The block-scaled call refuses fast accumulation (the double raises as torch did on
    an H100), so even a rule naming ``fp8_block`` leaves it off there; the per-tensor and
    per-channel schemes follow :data:`FAST_ACCUM`."""
    x, w, ws = _case(8, 128, 128)
    monkeypatch.setattr(cublas_fp8, "FAST_ACCUM",
                        {"fp8_block", "fp8_per_tensor", "fp8_per_channel"})
    for swap in (False, True):
        cublas_fp8.block_scaled_mm(x, w, ws, 448.0, torch.float32, swap=swap)
    assert [c["fast"] for c in double] == [False, False]
    assert not cublas_fp8.fast_accum("fp8_block")
    assert cublas_fp8.fast_accum("fp8_per_tensor") and cublas_fp8.fast_accum("fp8_per_channel")
    monkeypatch.setattr(cublas_fp8, "FAST_ACCUM", set())
    assert not cublas_fp8.fast_accum("fp8_per_tensor")


def test_the_double_refuses_fast_accumulation_with_block_scales() -> None:
    x, w, ws = _case(16, 128, 128)
    q, xs = quantize_rows(x, w.dtype, 448.0, BLOCK, group_major=True, row_multiple=4)
    with pytest.raises(RuntimeError, match="fast accum"):
        fake_scaled_mm(q, w.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.float32,
                       use_fast_accum=True)


def test_the_double_refuses_a_wrong_layout() -> None:
    """The double is not permissive: row-major 1x128 scales (what the Triton GEMM takes) are
    refused, as cuBLASLt's layout check refuses them."""
    x, w, ws = _case(16, 128, 256)
    q, xs = quantize_rows(x, w.dtype, 448.0, BLOCK)  # row-major scales
    with pytest.raises(RuntimeError, match="no block layout"):
        fake_scaled_mm(q, w.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.float32)
