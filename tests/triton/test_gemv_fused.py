"""The one-row GEMV with its prologues (RMSNorm after a residual add, SiLU-and-mul) and its
gated epilogue against float64, over ragged shapes (masked tails) and several launch shapes,
and the Triton unquantized methods' fused entry points (one row fused, more rows declined)."""

from __future__ import annotations

import pytest
import torch
from triton_refs import rel_err

from heteroserve.conformance.oracles.activation import gated
from heteroserve.core.kernels.linear import LinearShape

CONFIGS = (None, "small", "wide")


def _config(name: str | None):
    from heteroserve.platforms.triton.gemv import GemvConfig

    return {None: None, "small": GemvConfig(8, 32, 1, 1), "wide": GemvConfig(32, 128, 2, 1)}[name]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rms(h: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g.double()


@pytest.mark.parametrize("n,k,bias", [(128, 256, False), (200, 320, True), (37, 1000, False)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gemv_rms_norm_against_float64(device: torch.device, n: int, k: int, bias: bool,
                                       with_residual: bool) -> None:
    from heteroserve.platforms.triton.gemv import gemv_rms_norm

    g = _gen(n * k)
    w, x, r = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g), \
        torch.randn(1, k, generator=g)
    norm_w = torch.rand(k, generator=g) + 0.5
    b = torch.randn(n, generator=g) if bias else None
    h_ref = x + r if with_residual else x
    ref = _rms(h_ref, norm_w, 1e-5) @ w.double().T + (0 if b is None else b.double())
    x_dev, r_dev = x.to(device), r.to(device)
    for cfg in CONFIGS:
        y, h = gemv_rms_norm(x_dev, r_dev if with_residual else None, norm_w.to(device), 1e-5,
                             w.to(device), None if b is None else b.to(device), _config(cfg))
        assert y.shape == (1, n) and h.shape == (1, k)
        assert rel_err(y, ref) < 1e-5
        assert torch.equal(h.cpu(), h_ref)
        assert (h is x_dev) == (not with_residual)
    assert torch.equal(x_dev.cpu(), x) and torch.equal(r_dev.cpu(), r)


@pytest.mark.parametrize("n,k,bias", [(128, 256, True), (37, 1000, False)])
def test_gemv_silu_and_mul_against_float64(device: torch.device, n: int, k: int,
                                           bias: bool) -> None:
    from heteroserve.platforms.triton.gemv import gemv_silu_and_mul

    g = _gen(n + 7 * k)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, 2 * k, generator=g) * 3
    b = torch.randn(n, generator=g) if bias else None
    gate, up = x.double()[:, :k], x.double()[:, k:]
    ref = torch.nn.functional.silu(gate) * up @ w.double().T + (0 if b is None else b.double())
    for cfg in CONFIGS:
        y = gemv_silu_and_mul(x.to(device), w.to(device), None if b is None else b.to(device),
                              _config(cfg))
        assert y.shape == (1, n) and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("n,k,bias", [(64, 256, False), (37, 1000, True), (3, 48, False)])
def test_gemv_gated_against_float64(device: torch.device, activation: str, n: int, k: int,
                                    bias: bool) -> None:
    """``weight [2n, k]`` = ``[gate | up]`` rows -> ``act(gate) * up`` of ``n`` outputs; odd
    ``n`` and ``k`` leave masked tails in both halves."""
    from heteroserve.platforms.triton.gemv import gemv_gated

    g = _gen(3 * n + k)
    w, x = torch.randn(2 * n, k, generator=g), torch.randn(1, k, generator=g)
    b = torch.randn(2 * n, generator=g) if bias else None
    ref = gated(x.double() @ w.double().T + (0 if b is None else b.double()), activation)
    x_dev = x.to(device)
    for cfg in CONFIGS:
        y = gemv_gated(x_dev, w.to(device), activation, None if b is None else b.to(device),
                       _config(cfg))
        assert y.shape == (1, n) and rel_err(y, ref) < 1e-5
    assert gemv_gated(x_dev[0], w.to(device), activation).shape == (n,)
    assert torch.equal(x_dev.cpu(), x)


def test_fused_gemv_shape_errors(device: torch.device) -> None:
    from heteroserve.platforms.triton.gemv import gemv_rms_norm, gemv_silu_and_mul

    w = torch.randn(16, 64).to(device)
    with pytest.raises(ValueError, match="even"):
        gemv_silu_and_mul(torch.randn(1, 127).to(device), w)
    with pytest.raises(ValueError, match="input features"):
        gemv_silu_and_mul(torch.randn(1, 64).to(device), w)
    with pytest.raises(ValueError, match="norm weight"):
        gemv_rms_norm(torch.randn(1, 64).to(device), None, torch.ones(32).to(device), 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        gemv_rms_norm(torch.randn(1, 64).to(device), torch.randn(1, 64).double().to(device),
                      torch.ones(64).to(device), 1e-6, w)
    from heteroserve.platforms.triton.gemv import gemv_gated

    with pytest.raises(ValueError, match="odd number of rows"):
        gemv_gated(torch.randn(1, 64).to(device), torch.randn(15, 64).to(device), "silu")
    with pytest.raises(ValueError, match="activation"):
        gemv_gated(torch.randn(1, 64).to(device), w, "relu")


def test_unquantized_fused_entry_points(device: torch.device) -> None:
    """One row goes through the fused kernels and matches the separate ops; more rows are
    declined (None), as the contract allows; the plain method fuses nothing."""
    from heteroserve.platforms.triton.linear_float import (
        PrologueFusedUnquantizedLinear, UnquantizedLinear,
    )
    from heteroserve.platforms.triton.norm import fused_add_rms_norm

    g = _gen(5)
    method = PrologueFusedUnquantizedLinear()
    layer = torch.nn.Module()
    weight = torch.randn(96, 192, generator=g)
    specs = method.create_weights(LinearShape(192, 96, torch.float32))
    assert set(specs) == {"weight"}
    layer.register_parameter("weight", torch.nn.Parameter(weight.to(device),
                                                          requires_grad=False))
    x, r = torch.randn(1, 192, generator=g).to(device), torch.randn(1, 192, generator=g).to(device)
    norm_w = (torch.rand(192, generator=g) + 0.5).to(device)
    y, h = method.apply_rms_norm(layer, x, r, norm_w, 1e-6)
    normed, h_sep = fused_add_rms_norm(x.clone(), r.clone(), norm_w, 1e-6)
    assert torch.equal(h, h_sep) and rel_err(y, method.apply(layer, normed).double()) < 1e-5
    gate_up = torch.randn(1, 192, generator=g).to(device).repeat(1, 2)  # [gate | up], up = gate
    out = method.apply_silu_and_mul(layer, gate_up)
    sep = method.apply(layer, torch.nn.functional.silu(gate_up[:, :192]) * gate_up[:, :192])
    assert out is not None and rel_err(out, sep.double()) < 1e-5
    assert method.apply_rms_norm(layer, x.repeat(2, 1), r.repeat(2, 1), norm_w, 1e-6) is None
    assert method.apply_silu_and_mul(layer, gate_up.repeat(2, 1)) is None
    assert UnquantizedLinear().apply_rms_norm(layer, x, r, norm_w, 1e-6) is None
    gated = method.apply_gated(layer, x, "gelu_tanh")  # the gated epilogue, one row
    lin = method.apply(layer, x).double()
    sep = torch.nn.functional.gelu(lin[:, :48], approximate="tanh") * lin[:, 48:]
    assert gated is not None and gated.shape == (1, 48) and rel_err(gated, sep) < 1e-5
    assert method.apply_gated(layer, x.repeat(2, 1), "silu") is None
    assert UnquantizedLinear().apply_gated(layer, x, "silu") is None


def test_weight_cast_in_apply_is_not_read_before_the_wait(
        device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight cast inside ``apply`` is written by the kernel just before the GEMV, so the
    GEMV must not be told it is static (it would read it ahead of the PDL wait)."""
    from heteroserve.platforms.triton import linear_float

    seen: list[bool] = []
    real = linear_float.gemv

    def spy(x, weight, bias=None, config=None, static_weight=False):
        seen.append(static_weight)
        return real(x, weight, bias, config, static_weight)

    monkeypatch.setattr(linear_float, "gemv", spy)
    method = linear_float.UnquantizedLinear()
    layer = torch.nn.Module()
    layer.register_parameter("weight", torch.nn.Parameter(
        torch.randn(32, 64, generator=_gen(9)).to(device), requires_grad=False))
    x = torch.randn(1, 64, generator=_gen(10)).to(device)
    method.apply(layer, x)
    method.apply(layer, x.double())
    assert seen == [True, False]
