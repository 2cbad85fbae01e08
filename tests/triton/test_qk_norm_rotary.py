"""Triton fused per-head q/k RMSNorm + rotary against a float64 reference and against the
Triton ``rms_norm`` then ``rotary_embedding`` pair it replaces (fp32 inputs; interpreted on
CPU, compiled on a GPU); registration and the program-size choice."""

from __future__ import annotations

import pytest
import torch
from triton_refs import rel_err

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.dispatch import resolve_all
from heteroserve.core.kernels.registry import KernelRequest
from heteroserve.core.plugins.manager import load_plugins

EPS = 1e-6


def _ref(x: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor,
         neox: bool) -> torch.Tensor:
    """float64: each head RMS-normed with ``w``, then its first ``R`` dims rotated."""
    x = x.double().cpu()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double().cpu()
    half = cache.shape[1] // 2
    cos, sin = cache.double()[pos, :half][:, None], cache.double()[pos, half:][:, None]
    idx = torch.arange(half)
    i1, i2 = (idx, idx + half) if neox else (2 * idx, 2 * idx + 1)
    a, b = x[..., i1].clone(), x[..., i2].clone()
    x[..., i1], x[..., i2] = a * cos - b * sin, b * cos + a * sin
    return x


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("t,hq,hk,d,rot", [(1, 32, 4, 128, 128), (5, 6, 2, 64, 32),
                                           (3, 3, 3, 80, 48)])
def test_fused_equals_reference_and_the_two_ops(device: torch.device, neox: bool, t: int,
                                                hq: int, hk: int, d: int, rot: int) -> None:
    from heteroserve.platforms.triton.norm import rms_norm
    from heteroserve.platforms.triton.qk_norm import qk_norm_rotary
    from heteroserve.platforms.triton.rotary import apply_rotary

    g = torch.Generator().manual_seed(t * 1000 + d + neox)
    qkv = torch.randn(t, (hq + 2 * hk) * d + 8, generator=g) * 3  # 8 columns of padding
    qw, kw = torch.randn(d, generator=g), torch.randn(d, generator=g)
    cache = torch.randn(64, rot, generator=g)
    pos = torch.randint(0, 64, (t,), generator=g)
    qc, kc = hq * d, (hq + hk) * d

    def views(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return buf[:, :qc].view(t, hq, d), buf[:, qc:kc].view(t, hk, d)

    buf = qkv.clone().to(device)
    q, k = views(buf)  # strided views into a fused qkv buffer, as the decoder passes them
    out_q, out_k = qk_norm_rotary(q, k, qw.to(device), kw.to(device), EPS, pos.to(device),
                                  cache.to(device), neox)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    q0, k0 = views(qkv)
    assert rel_err(out_q, _ref(q0, qw, pos, cache, neox)) < 1e-6
    assert rel_err(out_k, _ref(k0, kw, pos, cache, neox)) < 1e-6
    assert torch.equal(buf[:, kc:].cpu(), qkv[:, kc:])  # v and padding untouched
    pair = qkv.clone().to(device)
    pq, pk = views(pair)
    two_q, two_k = apply_rotary(pos.to(device), rms_norm(pq, qw.to(device), EPS),
                                rms_norm(pk, kw.to(device), EPS), cache.to(device), neox)
    assert rel_err(out_q, two_q) < 1e-6 and rel_err(out_k, two_k) < 1e-6


def test_refuses_inconsistent_inputs(device: torch.device) -> None:
    from heteroserve.platforms.triton.qk_norm import qk_norm_rotary

    q, k = torch.zeros(2, 4, 64, device=device), torch.zeros(2, 2, 64, device=device)
    w, cache = torch.ones(64, device=device), torch.zeros(8, 64, device=device)
    pos = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="weights"):
        qk_norm_rotary(q, k, w, torch.ones(65, device=device), EPS, pos, cache, True)
    with pytest.raises(ValueError, match="differ"):
        qk_norm_rotary(q, k[:1], w, w, EPS, pos, cache, True)
    with pytest.raises(ValueError, match="cache width"):
        qk_norm_rotary(q, k, w, w, EPS, pos, torch.zeros(8, 66, device=device), True)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rotary(q, k, w, w, EPS, pos[:1], cache, True)


def test_program_size_spreads_small_batches() -> None:
    from heteroserve.platforms.triton.qk_norm import MIN_PROGRAMS, _block_heads

    # batch-1 decode of Qwen3-MoE (32 q heads, 4 kv heads, D 128): one head a program
    assert _block_heads(1, 32, 4, 128) == 1
    # a long prefill: whole tiles (4096 elements) per program
    assert _block_heads(8192, 32, 4, 128) == 32
    bh = _block_heads(16, 32, 4, 128)
    assert 16 * (-(-32 // bh) + -(-4 // bh)) >= MIN_PROGRAMS


def test_registered_for_cuda_and_rocm_with_fallback_elsewhere() -> None:
    registry = load_plugins().registry
    for platform in ("cuda", "rocm"):  # torch names a HIP device "cuda" too
        request = KernelRequest(platform, "cuda", torch.bfloat16, 128, 32, 4, 16)
        res = resolve_all(registry, request)[ops.QK_NORM_ROTARY]
        assert res.chosen.name == "triton" and res.native, (platform, res.rejected)
    for platform in ("npu", "xpu"):  # no vendor kernel: the torch-native fallback
        request = KernelRequest(platform, platform, torch.bfloat16, 128, 32, 4, 16)
        res = resolve_all(registry, request)[ops.QK_NORM_ROTARY]
        assert res.chosen.name == "torch_native" and not res.native, platform
