"""aiter (rocm) and IPEX (xpu) adapters through their documented-semantics doubles, against
float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer
from heteroserve.core.kernels.linear import LinearShape
from heteroserve.core.platform import KVLayout
from heteroserve.platforms.cpu.quant_pack import quantize_fp8_per_tensor, quantize_int8_per_channel
from heteroserve_vendor_doubles.batches import build_scenario, reference_attention

TOL = dict(atol=3e-2, rtol=3e-2)
CASES = [([5, 40, 1], [0, 33, 0]), ([17, 9, 64], [16, 8, 63])]  # extend mix; pure decode


def _config(page: int, d: int = 64) -> AttentionConfig:
    return AttentionConfig(num_q_heads=4, num_kv_heads=2, head_size=d, page_size=page,
                           dtype=torch.bfloat16, device=torch.device("cpu"))


@pytest.mark.parametrize("seq_lens,prefix_lens", CASES)
@pytest.mark.parametrize("page,window,cap", [(16, None, None), (1, None, 30.0), (32, 8, None)])
def test_aiter_attention(aiter_double, seq_lens, prefix_lens, page, window, cap):
    from heteroserve.platforms.rocm.attention import AiterPagedAttention

    decode = all(s - p == 1 for s, p in zip(seq_lens, prefix_lens))
    if decode and window:
        pytest.skip("aiter's ragged decode has no sliding window (the spec refuses it)")
    backend = AiterPagedAttention(_config(page))
    sc = build_scenario(seq_lens, prefix_lens, page_size=page, num_q_heads=4, num_kv_heads=2,
                        head_size=64, dtype=torch.bfloat16, seed=7)
    layer = AttentionLayer(0, scale=0.125, sliding_window=window, logit_cap=cap)
    out = backend.forward(sc.q, sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, layer, sc.meta)
    ref = reference_attention(sc, 0.125, window=window, soft_cap=cap)
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("seq_lens,prefix_lens", CASES)
def test_ipex_attention_hnd(ipex_double, seq_lens, prefix_lens):
    from heteroserve.platforms.xpu.attention import IpexPagedAttention

    backend = IpexPagedAttention(_config(16))
    assert backend.kv_cache_shape(5) == (5, 2, 16, 64)
    sc = build_scenario(seq_lens, prefix_lens, page_size=16, num_q_heads=4, num_kv_heads=2,
                        head_size=64, dtype=torch.bfloat16, layout=KVLayout.HND, seed=8)
    layer = AttentionLayer(0, scale=0.125)
    out = backend.forward(sc.q, sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, layer, sc.meta)
    torch.testing.assert_close(out.double(), reference_attention(sc, 0.125), **TOL)


def _ref_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


@pytest.mark.parametrize("vendor", ["rocm", "xpu"])
def test_norms(request, vendor):
    request.getfixturevalue("aiter_double" if vendor == "rocm" else "ipex_double")
    from importlib import import_module

    kernels = import_module(f"heteroserve.platforms.{vendor}.kernels")
    x, res, w = (torch.randn(4, 64).to(torch.bfloat16) for _ in range(2)), None, None
    x, res = list(x)
    w = torch.randn(64).to(torch.bfloat16)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5).double(),
                               _ref_norm(x.double(), w.double()), **TOL)
    want_sum = x.double() + res.double()
    y, summed = kernels.fused_add_rms_norm(x.clone(), res.clone(), w, 1e-5)
    torch.testing.assert_close(summed.double(), want_sum, **TOL)
    torch.testing.assert_close(y.double(), _ref_norm(want_sum, w.double()), **TOL)


@pytest.mark.parametrize("vendor", ["rocm", "xpu"])
def test_activations(request, vendor):
    request.getfixturevalue("aiter_double" if vendor == "rocm" else "ipex_double")
    from importlib import import_module

    kernels = import_module(f"heteroserve.platforms.{vendor}.kernels")

    x = torch.randn(3, 2 * 24).to(torch.bfloat16)
    g, u = x.double()[:, :24], x.double()[:, 24:]
    torch.testing.assert_close(kernels.silu_and_mul(x).double(), F.silu(g) * u, **TOL)
    if vendor == "xpu":
        torch.testing.assert_close(kernels.gelu_and_mul(x, "tanh").double(),
                                   F.gelu(g, approximate="tanh") * u, **TOL)


def _ref_rotary(pos, x, cache, neox):
    x = x.double().clone()
    rot = cache.shape[1]
    cos, sin = cache.double()[pos, : rot // 2][:, None], cache.double()[pos, rot // 2:][:, None]
    lo, hi = (slice(0, rot // 2), slice(rot // 2, rot)) if neox else \
        (slice(0, rot, 2), slice(1, rot, 2))
    a, b = x[..., lo].clone(), x[..., hi].clone()
    x[..., lo], x[..., hi] = a * cos - b * sin, b * cos + a * sin
    return x


@pytest.mark.parametrize("vendor", ["rocm", "xpu"])
@pytest.mark.parametrize("neox,rot", [(True, 64), (False, 32)])
def test_rotary(request, vendor, neox, rot):
    request.getfixturevalue("aiter_double" if vendor == "rocm" else "ipex_double")
    from importlib import import_module

    kernels = import_module(f"heteroserve.platforms.{vendor}.kernels")
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.arange(64, dtype=torch.float64)[:, None] * inv[None]
    cache = torch.cat((ang.cos(), ang.sin()), -1).to(torch.float32)
    pos = torch.tensor([3, 0, 63])
    q, k = torch.randn(3, 4, 64).to(torch.bfloat16), torch.randn(3, 2, 64).to(torch.bfloat16)
    q2, k2 = kernels.apply_rotary(pos, q.clone(), k.clone(), cache, neox)
    torch.testing.assert_close(q2.double(), _ref_rotary(pos, q, cache, neox), **TOL)
    torch.testing.assert_close(k2.double(), _ref_rotary(pos, k, cache, neox), **TOL)


def test_aiter_moe(aiter_double):
    from heteroserve.platforms.rocm import kernels

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 8, generator=gen)
    w, ids = kernels.topk_softmax(logits, 2, renormalize=False)
    ref_w, ref_i = torch.topk(torch.softmax(logits.double(), -1), 2)
    assert torch.equal(ids.long(), ref_i)
    torch.testing.assert_close(w.double(), ref_w)
    x = (torch.randn(5, 32, generator=gen) / 4).to(torch.bfloat16)
    w13 = (torch.randn(8, 32, 32, generator=gen) / 4).to(torch.bfloat16)
    w2 = (torch.randn(8, 32, 16, generator=gen) / 4).to(torch.bfloat16)
    out = kernels.fused_moe(x, w13, w2, w, ids)
    ref = torch.zeros(5, 32, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            ref[t] += w[t, j].double() * (w2[e].double() @ (F.silu(h[:16]) * h[16:]))
    torch.testing.assert_close(out.double(), ref, **TOL)


def _layer(method, shape, **tensors):
    layer = torch.nn.Module()
    for name, spec in method.create_weights(shape).items():
        layer.register_parameter(name, torch.nn.Parameter(tensors[name], requires_grad=False))
    method.process_weights_after_loading(layer)
    return layer


def test_aiter_int8_linear(aiter_double):
    from heteroserve.platforms.rocm.linear import AiterInt8W8A8Linear

    w = torch.randn(16, 64)
    qw, scale = quantize_int8_per_channel(w)
    method = AiterInt8W8A8Linear()
    layer = _layer(method, LinearShape(64, 16, torch.bfloat16), weight=qw, weight_scale=scale)
    x = torch.randn(3, 64).to(torch.bfloat16)
    ref = x.double() @ (qw.double() * scale.double()).t()
    torch.testing.assert_close(method.apply(layer, x).double(), ref, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("device_fp8", [torch.float8_e4m3fnuz, torch.float8_e4m3fn])
def test_aiter_fp8_linear_normalises_to_device_flavour(aiter_double, device_fp8):
    import aiter

    from heteroserve.platforms.rocm.linear import AiterFp8PerTensorLinear

    aiter.dtypes.fp8 = device_fp8
    try:
        w = torch.randn(16, 64)
        qw, scale = quantize_fp8_per_tensor(w, torch.float8_e4m3fn)
        method = AiterFp8PerTensorLinear()
        layer = _layer(method, LinearShape(64, 16, torch.bfloat16), weight=qw.clone(),
                       weight_scale=scale.clone())
        assert layer.weight.dtype == device_fp8
        dequant = layer.weight.double() * layer.weight_scale.double()
        torch.testing.assert_close(dequant, qw.double() * scale.double())  # exact
        x = torch.randn(3, 64).to(torch.bfloat16)
        # the scheme's contract: x quantized per tensor to the device's fp8, then exact math
        fmax = torch.finfo(device_fp8).max
        s = x.double().abs().max() / fmax
        xq = (x.double() / s).clamp(-fmax, fmax).to(device_fp8).double() * s
        ref = xq @ (qw.double() * scale.double()).t()
        torch.testing.assert_close(method.apply(layer, x).double(), ref, **TOL)
    finally:
        aiter.dtypes.fp8 = torch.float8_e4m3fnuz
