"""Norms and gated activations against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from heteroserve.platforms.cpu.activation import gelu_and_mul, silu_and_mul
from heteroserve.platforms.cpu.norm import fused_add_rms_norm, norm_add_norm, rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: {"atol": 1e-5, "rtol": 1e-5},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
            torch.float16: {"atol": 2e-3, "rtol": 2e-3}}[dtype]


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 96), (33, 128)])
def test_rms_norm(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(dtype)
    w = torch.randn(hidden, generator=gen).to(dtype)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), _rms_ref(x, w, 1e-6), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    res = torch.randn(5, 64, generator=gen).to(dtype)
    w = torch.randn(64, generator=gen).to(dtype)
    x0, res0 = x.clone(), res.clone()
    out, r = fused_add_rms_norm(x, res, w, 1e-5)
    ref_r = (x0.double() + res0.double())
    torch.testing.assert_close(r.double(), ref_r, **_tol(dtype))
    torch.testing.assert_close(out.double(), _rms_ref(ref_r, w, 1e-5), **_tol(dtype))
    assert r.dtype == dtype and out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_add_norm(dtype: torch.dtype) -> None:
    """Against float64 with the contract's rounding points; ``r`` lands in ``residual``."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 100, generator=gen) * 40).to(dtype)
    res = torch.randn(3, 100, generator=gen).to(dtype)
    w, w2 = (torch.randn(2, 100, generator=gen) * 0.2 + 1).to(dtype)
    y = _rms_ref(x, w, 1e-6).to(dtype)
    ref_r = (y.double() + res.double()).to(dtype).double()
    out, r = norm_add_norm(x.clone(), res, w, w2, 1e-6)
    assert r.data_ptr() == res.data_ptr() and r.dtype == out.dtype == dtype
    torch.testing.assert_close(r.double(), ref_r, **_tol(dtype))
    torch.testing.assert_close(out.double(), _rms_ref(ref_r, w2, 1e-6), **_tol(dtype))


def test_norm_shape_errors() -> None:
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.zeros(2, 8), torch.zeros(4), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(8), 1e-6)
    z = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="residual"):
        norm_add_norm(z, torch.zeros(2, 8, dtype=torch.float64), z[0], z[0], 1e-6)
    with pytest.raises(ValueError, match="hidden size"):
        norm_add_norm(z, z.clone(), z[0], torch.zeros(9), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 9])
def test_silu_and_mul(dtype: torch.dtype, tokens: int) -> None:
    x = torch.randn(tokens, 2 * 48, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    g, u = x.double()[:, :48], x.double()[:, 48:]
    ref = g / (1 + torch.exp(-g)) * u
    out = silu_and_mul(x)
    assert out.shape == (tokens, 48) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **_tol(dtype))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_and_mul(approximate: str, dtype: torch.dtype) -> None:
    x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(5)) * 2).to(dtype)
    g, u = x.double()[:, :32], x.double()[:, 32:]
    if approximate == "none":
        gelu = 0.5 * g * (1 + torch.special.erf(g / math.sqrt(2)))
    else:
        gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    torch.testing.assert_close(gelu_and_mul(x, approximate).double(), gelu * u, **_tol(dtype))


def test_activation_errors() -> None:
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul(torch.zeros(2, 8), "sigmoid")
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 7))
