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
                                           (3, 3, 3, 80, 48), (33, 16, 2, 256, 256)])
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


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rot", [64, 32], ids=["whole-head", "partial"])
def test_into_writes_contiguous_rows_and_leaves_the_views(device: torch.device, neox: bool,
                                                          rot: int) -> None:
    """``qk_norm_rotary_into``: the in-place op's values (bitwise: the same arithmetic), every
    dim included at a partial rotation, in fresh contiguous ``[T, H, D]`` rows; the strided
    q / k views of the qkv buffer keep their values; None for a strided last dim."""
    from heteroserve.platforms.triton.qk_norm import qk_norm_rotary, qk_norm_rotary_into

    t, hq, hk, d = 5, 4, 2, 64
    g = torch.Generator().manual_seed(rot + neox)
    qkv = (torch.randn(t, (hq + 2 * hk) * d, generator=g) * 3).to(device)
    qw, kw = torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)
    cache = torch.randn(64, rot, generator=g).to(device)
    pos = torch.randint(0, 64, (t,), generator=g).to(device)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    before = qkv.clone()
    into = qk_norm_rotary_into(q, k, qw, kw, EPS, pos, cache, neox)
    assert into is not None
    q_out, k_out = into
    assert torch.equal(qkv, before)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert q_out.shape == (t, hq, d) and k_out.shape == (t, hk, d)
    q_ref, k_ref = qk_norm_rotary(q.clone(), k.clone(), qw, kw, EPS, pos, cache, neox)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    q_t = qkv[:, :hq * d].view(t, d, hq).transpose(1, 2)  # last dim strided
    assert qk_norm_rotary_into(q_t, k, qw, kw, EPS, pos, cache, neox) is None
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rotary_into(q, k, qw, kw, EPS, pos[:2], cache, neox)


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


@pytest.mark.parametrize("tokens", [1, 3, 16, 33, 8192])
@pytest.mark.parametrize("tile_d", [64, 128, 129, 257, 4096, 5000])
def test_program_size_is_a_power_of_two(tokens: int, tile_d: int) -> None:
    from heteroserve.platforms.triton.qk_norm import MAX_TILE, MIN_PROGRAMS, _block_heads

    bh = _block_heads(tokens, 32, 4, tile_d)
    assert bh >= 1 and bh & (bh - 1) == 0
    assert bh == 1 or bh * tile_d <= MAX_TILE
    assert bh == 1 or tokens * (-(-32 // bh) + -(-4 // bh)) >= MIN_PROGRAMS


def test_program_size_spreads_small_batches() -> None:
    from heteroserve.platforms.triton.qk_norm import _block_heads

    # batch-1 decode of Qwen3-MoE (32 q heads, 4 kv heads, D 128): one head a program
    assert _block_heads(1, 32, 4, 128) == 1
    assert _block_heads(8192, 32, 4, 128) == 32  # a long prefill: the largest tile that fits
    assert _block_heads(8192, 32, 4, 64 + 32) == 32  # partial rotary 64 of 80: 96 padded


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


def _conformance_cases() -> list:
    from types import SimpleNamespace

    from heteroserve.conformance.cases.qk_norm import qk_norm_rotary_cases

    return qk_norm_rotary_cases(SimpleNamespace(quick=True))  # type: ignore[arg-type]


@pytest.mark.parametrize("case", _conformance_cases(), ids=lambda c: c.name)
def test_conformance_grid_every_dtype(device: torch.device, case) -> None:
    """The conformance suite's quick grid and bounds, bf16 and fp16 included (the kernel has
    no ``tl.dot``, so the interpreter rounds as the GPU does)."""
    from heteroserve.conformance.oracles.qk_norm import qk_norm_rotary as oracle
    from heteroserve.conformance.test_qk_norm import make_inputs
    from heteroserve.conformance.tolerances import tolerance
    from heteroserve.platforms.triton.qk_norm import qk_norm_rotary

    inp = make_inputs(case, device)
    q, k = inp.views(case)
    q0, k0 = q.clone(), k.clone()
    out = qk_norm_rotary(q, k, inp.q_weight, inp.k_weight, case.eps, inp.positions_dev,
                         inp.cache_dev, case.is_neox)
    for got, x, w in ((out[0], q0, inp.q_weight), (out[1], k0, inp.k_weight)):
        ref = oracle(x, w, case.eps, inp.positions, inp.cache, case.is_neox)
        assert got.dtype == case.dtype
        assert rel_err(got, ref) <= tolerance(case.dtype).max_rel_err
