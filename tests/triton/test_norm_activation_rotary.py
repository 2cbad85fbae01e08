"""Triton RMSNorm, fused add+RMSNorm, gated activations and rotary against float64 references
(fp32 inputs; interpreted on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_refs import rel_err


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows,hidden", [(5, 64), (3, 100), (1, 1000)])
def test_rms_norm(device: torch.device, rows: int, hidden: int) -> None:
    from heteroserve.platforms.triton.norm import rms_norm

    g = _gen(hidden)
    x = torch.randn(rows, hidden, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    out = rms_norm(x.to(device), w.to(device), 1e-6)
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert out.shape == x.shape and rel_err(out, ref) < 1e-6


def test_fused_add_rms_norm(device: torch.device) -> None:
    from heteroserve.platforms.triton.norm import fused_add_rms_norm

    g = _gen(1)
    x, r = torch.randn(2, 3, 96, generator=g), torch.randn(2, 3, 96, generator=g)
    w = torch.randn(96, generator=g)
    out, res = fused_add_rms_norm(x.clone().to(device), r.clone().to(device), w.to(device), 1e-5)
    s = x.double() + r.double()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert rel_err(res, s) < 1e-7 and rel_err(out, ref) < 1e-6
    with pytest.raises(ValueError, match="differ"):
        fused_add_rms_norm(x.to(device), r[:1].to(device), w.to(device), 1e-5)


def test_rms_norm_bad_weight(device: torch.device) -> None:
    from heteroserve.platforms.triton.norm import rms_norm

    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.zeros(2, 8, device=device), torch.ones(9, device=device), 1e-6)


@pytest.mark.parametrize("inter", [7, 1500])
def test_gated_activations(device: torch.device, inter: int) -> None:
    from heteroserve.platforms.triton.activation import gelu_and_mul, silu_and_mul

    x = torch.randn(3, 2 * inter, generator=_gen(inter)) * 4
    gate, up = x.double().chunk(2, dim=-1)
    assert rel_err(silu_and_mul(x.to(device)), F.silu(gate) * up) < 1e-6
    assert rel_err(gelu_and_mul(x.to(device)), F.gelu(gate) * up) < 1e-6
    assert rel_err(gelu_and_mul(x.to(device), "tanh"), F.gelu(gate, approximate="tanh") * up) < 1e-6
    with pytest.raises(ValueError, match="approximate"):
        gelu_and_mul(x.to(device), "fast")
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 5, device=device))


def _rotary_ref(x: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, neox: bool) -> torch.Tensor:
    x = x.double().clone()
    half = cache.shape[1] // 2
    cos, sin = cache.double()[pos, :half][:, None], cache.double()[pos, half:][:, None]
    if neox:
        i1, i2 = torch.arange(half), torch.arange(half) + half
    else:
        i1, i2 = 2 * torch.arange(half), 2 * torch.arange(half) + 1
    a, b = x[..., i1].clone(), x[..., i2].clone()
    x[..., i1], x[..., i2] = a * cos - b * sin, b * cos + a * sin
    return x


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot_dim", [64, 32])
def test_rotary(device: torch.device, neox: bool, rot_dim: int) -> None:
    from heteroserve.platforms.triton.rotary import apply_rotary

    g = _gen(rot_dim + neox)
    t, hq, hk, d = 6, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g)
    cache = torch.randn(50, rot_dim, generator=g)
    pos = torch.randint(0, 50, (t,), generator=g)
    q_ref = _rotary_ref(qkv[:, :hq * d].view(t, hq, d), pos, cache, neox)
    k_ref = _rotary_ref(qkv[:, hq * d:(hq + hk) * d].view(t, hk, d), pos, cache, neox)
    buf = qkv.clone().to(device)
    q = buf[:, :hq * d].view(t, hq, d)  # strided views into a fused qkv buffer
    k = buf[:, hq * d:(hq + hk) * d].view(t, hk, d)
    q_out, k_out = apply_rotary(pos.to(device), q, k, cache.to(device), neox)
    assert rel_err(q_out, q_ref) < 1e-6 and rel_err(k_out, k_ref) < 1e-6
    assert torch.equal(buf[:, (hq + hk) * d:].cpu(), qkv[:, (hq + hk) * d:])  # v untouched


@pytest.mark.parametrize("neox", [True, False])
def test_rotate_into_writes_contiguous_rows_and_leaves_the_views(device: torch.device,
                                                                 neox: bool) -> None:
    """``rotate_into``: the in-place rotation's values (bitwise: the same arithmetic) in
    fresh contiguous ``[T, H, D]`` rows; the strided q / k views of the qkv buffer keep their
    values; None for a rotation over part of each head."""
    from heteroserve.platforms.triton.rotary import apply_rotary, rotate_into

    g = _gen(7 + neox)
    t, hq, hk, d = 6, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(device)
    cache = torch.randn(50, d, generator=g).to(device)
    pos = torch.randint(0, 50, (t,), generator=g).to(device)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    before = qkv.clone()
    rotated = rotate_into(pos, q, k, cache, neox)
    assert rotated is not None
    q_out, k_out = rotated
    assert torch.equal(qkv, before)  # the views are left as they were
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert q_out.shape == (t, hq, d) and k_out.shape == (t, hk, d)
    q_ref, k_ref = apply_rotary(pos, q.clone(), k.clone(), cache, neox)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert rotate_into(pos, q, k, cache[:, :32], neox) is None  # partial rotation
    with pytest.raises(ValueError, match="token count"):
        rotate_into(pos[:3], q, k, cache, neox)
