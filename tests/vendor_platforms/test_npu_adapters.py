"""torch_npu adapters through the documented-semantics double, against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer
from heteroserve.core.kernels.linear import LinearShape
from heteroserve.core.kernels.ops import SamplingBatch
from heteroserve.platforms.cpu.quant_pack import pack_awq, pack_gptq, quantize_int8_per_channel
from heteroserve_vendor_doubles.batches import build_scenario, reference_attention

BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def _npu_attention(page_size: int = 128, hq: int = 4, hk: int = 2, d: int = 64):
    from heteroserve.platforms.npu.attention import NpuFusedInferAttention

    cfg = AttentionConfig(num_q_heads=hq, num_kv_heads=hk, head_size=d, page_size=page_size,
                          dtype=torch.bfloat16, device=torch.device("cpu"))
    return NpuFusedInferAttention(cfg)


@pytest.mark.parametrize("seq_lens,prefix_lens", [
    ([5, 130, 1], [0, 100, 0]),      # prefill, chunked prefill over a 100-token prefix, len 1
    ([257, 3], [250, 0]),            # prefix spanning two pages plus an odd tail
])
def test_npu_extend_matches_reference(torch_npu_double, seq_lens, prefix_lens):
    backend = _npu_attention()
    sc = build_scenario(seq_lens, prefix_lens, page_size=128, num_q_heads=4, num_kv_heads=2,
                        head_size=64, dtype=torch.bfloat16, seed=1)
    layer = AttentionLayer(layer_id=0, scale=64 ** -0.5)
    out = backend.forward(sc.q, sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, layer, sc.meta)
    ref = reference_attention(sc, layer.scale)
    assert out.shape == sc.q.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.to(torch.float64), ref, **BF16_TOL)


def test_npu_decode_matches_reference_and_writes_only_new_slots(torch_npu_double):
    backend = _npu_attention()
    sc = build_scenario([129, 7, 300], [128, 6, 299], page_size=128, num_q_heads=4,
                        num_kv_heads=2, head_size=64, dtype=torch.bfloat16, seed=2)
    before = torch.isnan(sc.k_cache).sum()
    layer = AttentionLayer(layer_id=0, scale=0.1)
    out = backend.forward(sc.q, sc.k_new, sc.v_new, sc.k_cache, sc.v_cache, layer, sc.meta)
    torch.testing.assert_close(out.to(torch.float64), reference_attention(sc, 0.1), **BF16_TOL)
    written = before - torch.isnan(sc.k_cache).sum()
    assert int(written) == 3 * 2 * 64  # three tokens, nothing else touched


def test_npu_attention_rejects_other_page_sizes(torch_npu_double):
    with pytest.raises(ValueError, match="page_size 128"):
        _npu_attention(page_size=16)


def test_npu_norms_activation(torch_npu_double):
    from heteroserve.platforms.npu import kernels

    x = torch.randn(5, 96).to(torch.bfloat16)
    res = torch.randn(5, 96).to(torch.bfloat16)
    w = torch.randn(96).to(torch.bfloat16)
    xd, rd, wd = x.double(), res.double(), w.double()

    def ref_norm(t: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * wd

    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6).double(), ref_norm(xd), **BF16_TOL)
    y, summed = kernels.fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(summed.double(), xd + rd, **BF16_TOL)
    torch.testing.assert_close(y.double(), ref_norm(xd + rd), **BF16_TOL)
    gu = torch.randn(3, 2 * 40).to(torch.bfloat16)
    torch.testing.assert_close(kernels.silu_and_mul(gu).double(),
                               F.silu(gu.double()[:, :40]) * gu.double()[:, 40:], **BF16_TOL)


def _ref_rotary(pos, x, cache, neox):
    x = x.double().clone()
    rot = cache.shape[1]
    cos, sin = cache.double()[pos, : rot // 2][:, None], cache.double()[pos, rot // 2:][:, None]
    if neox:
        a, b = x[..., : rot // 2].clone(), x[..., rot // 2: rot].clone()
        x[..., : rot // 2], x[..., rot // 2: rot] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., 0:rot:2].clone(), x[..., 1:rot:2].clone()
        x[..., 0:rot:2], x[..., 1:rot:2] = a * cos - b * sin, b * cos + a * sin
    return x


def rotary_cache(max_pos: int, rot: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat((ang.cos(), ang.sin()), -1).to(torch.float32)


@pytest.mark.parametrize("neox,rot", [(True, 64), (False, 64), (True, 32)])
def test_npu_rotary(torch_npu_double, neox, rot):
    from heteroserve.platforms.npu import kernels

    pos = torch.tensor([0, 5, 17, 3])
    q, k = torch.randn(4, 4, 64).to(torch.bfloat16), torch.randn(4, 2, 64).to(torch.bfloat16)
    cache = rotary_cache(32, rot)
    q2, k2 = kernels.apply_rotary(pos, q.clone(), k.clone(), cache, neox)
    torch.testing.assert_close(q2.double(), _ref_rotary(pos, q, cache, neox), **BF16_TOL)
    torch.testing.assert_close(k2.double(), _ref_rotary(pos, k, cache, neox), **BF16_TOL)


def _ref_moe(x, w13, w2, tw, ids):
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            out[t] += tw[t, j].double() * (w2[e].double() @ (F.silu(h[:inter]) * h[inter:]))
    return out


def test_npu_moe_routing_and_experts(torch_npu_double):
    from heteroserve.platforms.npu import kernels

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 8, generator=gen)
    weights, ids = kernels.topk_softmax(logits, 2, renormalize=True)
    probs = torch.softmax(logits.double(), -1)
    ref_w, ref_i = torch.topk(probs, 2)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_i)
    torch.testing.assert_close(weights.double(), ref_w / ref_w.sum(-1, keepdim=True))
    x = (torch.randn(7, 32, generator=gen) / 4).to(torch.bfloat16)
    w13 = (torch.randn(8, 2 * 16, 32, generator=gen) / 4).to(torch.bfloat16)
    w2 = (torch.randn(8, 32, 16, generator=gen) / 4).to(torch.bfloat16)
    out = kernels.fused_moe(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _ref_moe(x, w13, w2, weights, ids), **BF16_TOL)


def _layer(method, shape: LinearShape, **tensors: torch.Tensor) -> torch.nn.Module:
    specs = method.create_weights(shape)
    layer = torch.nn.Module()
    for name, spec in specs.items():
        t = tensors[name]
        assert tuple(t.shape) == spec.shape, name
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    method.process_weights_after_loading(layer)
    return layer


def test_npu_int8_w8a8(torch_npu_double):
    from heteroserve.platforms.npu.linear import NpuInt8W8A8Linear

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=gen)
    qw, scale = quantize_int8_per_channel(w)
    method = NpuInt8W8A8Linear()
    layer = _layer(method, LinearShape(64, 24, torch.bfloat16), weight=qw, weight_scale=scale)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16)
    out = method.apply(layer, x, bias=torch.ones(24, dtype=torch.bfloat16))
    ref = x.double() @ (qw.double() * scale.double()).t() + 1.0
    assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=0.15, rtol=0.05)  # int8 activations


@pytest.mark.parametrize("scheme,act_order,group", [
    ("awq", False, 32), ("gptq", False, 32), ("gptq", True, 32), ("awq", False, 64)])
def test_npu_w4a16(torch_npu_double, scheme, act_order, group):
    from heteroserve.platforms.npu.linear import NpuAwqW4A16Linear, NpuGptqW4A16Linear

    gen = torch.Generator().manual_seed(5)
    n, k = 16, 64
    w = torch.randn(n, k, generator=gen)
    if scheme == "awq":
        qweight, qzeros, scales = pack_awq(w, group)
        method, tensors = NpuAwqW4A16Linear(), dict(qweight=qweight, qzeros=qzeros, scales=scales)
        shape = LinearShape(k, n, torch.float16, group_size=group)
    else:
        qweight, qzeros, scales, g_idx = pack_gptq(w, group, act_order=act_order, sym=False)
        method = NpuGptqW4A16Linear()
        tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
        shape = LinearShape(k, n, torch.float16, group_size=group, has_g_idx=True)
    reference_method = type(method).__mro__[2]()  # the torch-native class it extends
    ref_layer = _layer(reference_method, shape, **{a: b.clone() for a, b in tensors.items()})
    layer = _layer(method, shape, **tensors)
    x = torch.randn(3, k, generator=gen).to(torch.float16)
    out = method.apply(layer, x)
    ref = reference_method.apply(ref_layer, x.double().to(torch.float32)).double()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def _batch(b: int, **over) -> SamplingBatch:
    fields = dict(temperatures=torch.ones(b), top_ks=torch.zeros(b, dtype=torch.int32),
                  top_ps=torch.ones(b), min_ps=torch.zeros(b),
                  seeds=torch.arange(b, dtype=torch.int64), steps=torch.zeros(b, dtype=torch.int64))
    fields.update(over)
    return SamplingBatch(**fields)


@pytest.mark.parametrize("vocab", [50, 2000])
def test_npu_sampling_filters_and_matches_native(torch_npu_double, vocab):
    from heteroserve.platforms.cpu.sampling import sample as native
    from heteroserve.platforms.npu.sampling import sample

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, vocab, generator=gen) * 3
    logits[:, 7] = float("-inf")
    params = _batch(6, temperatures=torch.tensor([0.0, 0.7, 1.0, 1.3, 1.0, 0.9]),
                    top_ks=torch.tensor([0, 3, 0, 0, 5, 1500], dtype=torch.int32),
                    top_ps=torch.tensor([1.0, 1.0, 0.8, 0.5, 0.9, 0.95]))
    for step in range(20):
        params.steps = torch.full((6,), step, dtype=torch.int64)
        got = sample(logits, params)
        assert torch.equal(got, native(logits, params)), step
        assert got[0] == logits[0].argmax() and not bool((got == 7).any())
        top3 = torch.topk(logits[1], 3).indices
        assert bool((top3 == got[1]).any())
