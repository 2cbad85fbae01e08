"""Triton linear methods and their kernels against float64: activation quantization, the
scaled GEMM (block scales with fp32 stand-ins for fp8; int8), W4A16 AWQ/GPTQ (plain,
act-order as a permutation, arbitrary g_idx) and int8 W8A8 end to end. fp8 itself needs a GPU
(the interpreter has no fp8): see test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from triton_refs import rel_err

from heteroserve.conformance import quantize
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.core.kernels.linear import LinearShape


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(method: object, shape: LinearShape, ckpt: dict[str, torch.Tensor],
           device: torch.device) -> torch.nn.Module:
    specs = method.create_weights(shape)  # type: ignore[attr-defined]
    assert set(specs) == set(ckpt)
    layer = torch.nn.Module()
    for name, spec in specs.items():
        assert (tuple(spec.shape), spec.dtype) == (tuple(ckpt[name].shape), ckpt[name].dtype)
        layer.register_parameter(name, torch.nn.Parameter(ckpt[name].to(device),
                                                          requires_grad=False))
    method.process_weights_after_loading(layer)  # type: ignore[attr-defined]
    return layer


def test_quantize_rows_int8_and_groups(device: torch.device) -> None:
    from heteroserve.platforms.triton.quant import quantize_rows

    x = torch.randn(5, 300, generator=_gen(0)) * 3
    q, s = quantize_rows(x.to(device), torch.int8, 127.0, None)
    ref_s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    assert s.shape == (5, 1) and rel_err(s, ref_s) < 1e-7
    assert (q.cpu().long() - torch.round(x / ref_s).long()).abs().max() <= 1  # rounding only
    qf, sf = quantize_rows(x.to(device), torch.float32, 448.0, 128)  # fp32 output: no rounding
    ref_g = torch.stack([(x[:, j:j + 128].abs().amax(-1) / 448) for j in (0, 128, 256)], -1)
    assert sf.shape == (5, 3) and rel_err(sf, ref_g) < 1e-7
    deq = qf.cpu() * sf.cpu().repeat_interleave(128, 1)[:, :300]
    assert rel_err(deq, x) < 1e-6
    # group-major scales (cuBLASLt's 1x128 layout): same values, strides (1, M)
    qg, sg = quantize_rows(x.to(device), torch.float32, 448.0, 128, group_major=True)
    assert sg.shape == (5, 3) and sg.stride() == (1, 5)
    assert torch.equal(sg.cpu(), sf.cpu()) and torch.equal(qg.cpu(), qf.cpu())


def test_quantize_rows_gated_quantizes_silu_and_mul(device: torch.device) -> None:
    """``gated``: ``[gate | up]`` quantized as the SiLU-and-mul op's bf16 output would be, in
    the same launch (ragged last group, group-major padded scales); odd widths and an amax
    are refused."""
    from heteroserve.platforms.triton.activation import silu_and_mul
    from heteroserve.platforms.triton.quant import quantize_rows

    x = (torch.randn(6, 600, generator=_gen(3)) * 4).to(device, torch.bfloat16)
    q, s = quantize_rows(x, torch.float32, 448.0, 128, group_major=True, row_multiple=4,
                         gated=True)
    q_ref, s_ref = quantize_rows(silu_and_mul(x), torch.float32, 448.0, 128)
    assert q.shape == (8, 300) and s.shape == (8, 3) and s.stride() == (1, 8)
    assert torch.equal(q[:6].cpu(), q_ref.cpu()) and torch.equal(s[:6].cpu(), s_ref.cpu())
    with pytest.raises(ValueError, match="even width"):
        quantize_rows(x[:, :599], torch.float32, 448.0, 128, gated=True)
    with pytest.raises(ValueError, match="no amax"):
        quantize_rows(x, torch.float32, 448.0, None, amax=x.float().abs().max(), gated=True)


@pytest.mark.parametrize("scale_of", ["amax", "zeros"])
def test_quantize_rows_per_tensor_scale_from_amax(device: torch.device, scale_of: str) -> None:
    """Given the tensor's amax, the kernel computes ``max(amax / qmax, 1e-12)`` itself and
    quantizes exactly as with that scale precomputed (all-zero input: the floor scale)."""
    from heteroserve.platforms.triton.quant import quantize_rows

    x = torch.randn(7, 260, generator=_gen(1)) * 5 if scale_of == "amax" else torch.zeros(3, 64)
    xd = x.to(device)
    amax = torch.linalg.vector_norm(xd, float("inf"), dtype=torch.float32)
    q, s = quantize_rows(xd, torch.int8, 127.0, None, amax=amax)
    ref_s = (x.abs().max() / 127).clamp(min=1e-12).reshape(1)
    q_ref, _ = quantize_rows(xd, torch.int8, 127.0, None, scale=ref_s.to(device))
    assert s.shape == (1,) and torch.equal(s.cpu(), ref_s)
    assert torch.equal(q.cpu(), q_ref.cpu())
    _, s_empty = quantize_rows(xd[:0], torch.int8, 127.0, None, amax=amax)
    assert torch.equal(s_empty.cpu(), ref_s)


def test_scaled_gemm_block_scales(device: torch.device) -> None:
    from heteroserve.platforms.triton.scaled_gemm import scaled_gemm

    g = _gen(1)
    m, n, k = 7, 200, 320
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    sa = torch.rand(m, 3, generator=g) + 0.5
    sb = torch.rand(2, 3, generator=g) + 0.5
    bias = torch.randn(n, generator=g)
    out = scaled_gemm(a.to(device), b.to(device), sa.to(device), (3, 1), sb.to(device), (3, 1),
                      128, 128, torch.float32, bias=bias.to(device), per_k_scales=True,
                      config=(16, 32, 32, 1, 1))
    a_deq = a.double() * sa.double().repeat_interleave(128, 1)[:, :k]
    b_deq = b.double() * sb.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    assert rel_err(out, a_deq @ b_deq.T + bias.double()) < 1e-6


def test_scaled_gemm_row_and_channel_scales(device: torch.device) -> None:
    """The call fp8_per_channel makes: one scale per row of A, one per row of B, constant
    over K, accumulated per 128-column tile (fp32 stand-ins for fp8)."""
    from heteroserve.platforms.triton.scaled_gemm import scaled_gemm

    g = _gen(3)
    m, n, k = 5, 96, 320
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    sa, sb = torch.rand(m, 1, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    out = scaled_gemm(a.to(device), b.to(device), sa.to(device), (1, 0), sb.to(device), (1, 0),
                      1, 128, torch.float32, per_k_scales=True, config=(16, 32, 32, 1, 1))
    ref = (a.double() * sa.double()) @ (b.double() * sb.double()[:, None]).T
    assert rel_err(out, ref) < 1e-6


def test_int8_w8a8_linear(device: torch.device) -> None:
    from heteroserve.platforms.triton.linear_w8a8 import Int8W8A8Linear

    g = _gen(2)
    t, k, n = 7, 256, 96
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    ckpt = quantize.quantize_int8_per_channel(w)
    method = Int8W8A8Linear()
    layer = _layer(method, LinearShape(k, n, torch.float32), ckpt, device)
    x = quantize.w8a8_activations(g, t, k, "int8_w8a8", torch.float32, None)
    bias = torch.randn(n, generator=g)
    out = method.apply(layer, x.to(device), bias.to(device))
    ref = oracle.linear("int8_w8a8", x, ckpt, 128, bias, None)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("t,k,n,group", [(1, 256, 128, 128), (5, 128, 64, 32)])
def test_awq(device: torch.device, t: int, k: int, n: int, group: int) -> None:
    from heteroserve.platforms.triton.linear_w4a16 import AwqW4A16Linear

    g = _gen(k + n)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    ckpt = quantize.pack_awq(w, group)
    method = AwqW4A16Linear()
    layer = _layer(method, LinearShape(k, n, torch.float32, group), ckpt, device)
    x = torch.randn(2, t, k, generator=g)
    out = method.apply(layer, x.to(device))
    ref = oracle.linear("awq_w4a16", x.view(-1, k), ckpt, group, None, None)
    assert out.shape == (2, t, n) and rel_err(out.reshape(-1, n), ref) < 1e-5


@pytest.mark.parametrize("dequant", [False, True], ids=["gemm", "dequant_blas"])
@pytest.mark.parametrize("kind", ["plain", "act_order", "ragged_g_idx"])
def test_gptq(device: torch.device, kind: str, dequant: bool,
              monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows through the dequantizing GEMM, or (``W4_DEQUANT_MIN_ROWS`` lowered) through
    the dequantized weight and the BLAS GEMM, including a kept ragged ``g_idx``."""
    from heteroserve.platforms.triton import linear_w4a16
    from heteroserve.platforms.triton.linear_w4a16 import GptqW4A16Linear

    if dequant:
        monkeypatch.setattr(linear_w4a16, "W4_DEQUANT_MIN_ROWS", 3)

    g = _gen(len(kind))
    t, k, n, group = 3, 256, 64, 64
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    g_idx = None
    if kind == "act_order":
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // group
    elif kind == "ragged_g_idx":  # groups of unequal sizes: kept as g_idx for the kernel
        g_idx = torch.randint(0, k // group, (k,), generator=g)
        g_idx[: k // group] = torch.arange(k // group)
    ckpt = quantize.pack_gptq(w, group, g_idx)
    method = GptqW4A16Linear()
    layer = _layer(method, LinearShape(k, n, torch.float32, group, g_idx is not None), ckpt,
                   device)
    assert hasattr(layer, "w4_perm") == (kind == "act_order")
    assert hasattr(layer, "w4_g_idx") == (kind == "ragged_g_idx")
    x = torch.randn(t, k, generator=g)
    bias = torch.randn(n, generator=g)
    out = method.apply(layer, x.to(device), bias.to(device))
    ref = oracle.linear("gptq_w4a16", x, ckpt, group, bias, None)
    assert rel_err(out, ref) < 1e-5


def test_shape_errors() -> None:
    from heteroserve.platforms.triton.linear_w4a16 import AwqW4A16Linear, GptqW4A16Linear

    with pytest.raises(ValueError, match="group size"):
        AwqW4A16Linear().create_weights(LinearShape(100, 64, torch.float16, 128))
    with pytest.raises(ValueError, match="output size"):
        GptqW4A16Linear().create_weights(LinearShape(128, 60, torch.float16, 128))


@pytest.mark.parametrize("n,k,bias", [(128, 256, False), (200, 320, True), (37, 1000, False)])
def test_gemv_one_row_against_float64(device: torch.device, n: int, k: int, bias: bool) -> None:
    """The one-row GEMV computes ``W @ x + b`` over ragged N and K (masked tail blocks), with
    every output written (poisoned first)."""
    from heteroserve.platforms.triton.gemv import GemvConfig, gemv

    g = _gen(n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    for cfg in (None, GemvConfig(8, 32, 1, 1), GemvConfig(32, 128, 2, 1),
                GemvConfig(8, 64, 1, 1, fold=8)):
        out = gemv(x.to(device), w.to(device), None if b is None else b.to(device), cfg)
        assert out.shape == (1, n) and torch.isfinite(out).all()
        assert rel_err(out, ref) < 1e-5
    flat = gemv(x[0].to(device), w.to(device))
    assert flat.shape == (n,)


def test_gemv_rejects_bad_shapes(device: torch.device) -> None:
    from heteroserve.platforms.triton.gemv import gemv

    w = torch.randn(16, 64).to(device)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 64).to(device), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 64).to(device), w, torch.randn(8).to(device))


def test_unquantized_linear_one_row_matches_many(device: torch.device) -> None:
    """A row through the GEMV path equals the same row inside a multi-row F.linear call."""
    from heteroserve.platforms.triton.linear_float import UnquantizedLinear

    g = _gen(11)
    method = UnquantizedLinear()
    shape = LinearShape(192, 96, torch.float32)
    layer = _layer(method, shape, {"weight": torch.randn(96, 192, generator=g)}, device)
    x = torch.randn(3, 192, generator=g).to(device)
    bias = torch.randn(96, generator=g).to(device)
    many = method.apply(layer, x, bias)
    one = method.apply(layer, x[1:2], bias)
    assert rel_err(one, many[1:2]) < 1e-5


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_upcast_gemv_reads_narrow_activations_into_an_fp32_layer(
        device: torch.device, x_dtype: torch.dtype) -> None:
    """``apply_upcast``: a bf16/fp16 row into an fp32 layer (DeepSeek's router) gives the fp32
    product of the widened row, in fp32; several rows, or a bf16 layer, decline (None)."""
    from heteroserve.platforms.triton.linear_float import UnquantizedLinear

    g = _gen(12)
    method = UnquantizedLinear()
    layer = _layer(method, LinearShape(320, 64, torch.float32),
                   {"weight": torch.randn(64, 320, generator=g)}, device)
    x = torch.randn(1, 320, generator=g).to(x_dtype)
    bias = torch.randn(64, generator=g)
    out = method.apply_upcast(layer, x.to(device), bias.to(device))
    assert out is not None and out.dtype == torch.float32 and out.shape == (1, 64)
    ref = x.double() @ layer.weight.cpu().double().T + bias.double()
    assert rel_err(out, ref) < 1e-5
    assert method.apply_upcast(layer, x.repeat(2, 1).to(device)) is None
    narrow = _layer(method, LinearShape(320, 64, torch.bfloat16),
                    {"weight": torch.randn(64, 320, generator=g).bfloat16()}, device)
    assert method.apply_upcast(narrow, x.to(device)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,group,ragged", [(256, 64, False), (200, 40, False), (128, 0, True)])
def test_w4a16_dequantize_matches_the_unpacked_weight(device: torch.device, dtype: torch.dtype,
                                                      k: int, group: int, ragged: bool) -> None:
    """Every element equals ``(q - zero) * scale`` of its group (``k // group`` or ``g_idx``)
    computed in float64 and rounded once to ``dtype`` (within one bf16 step in the
    interpreter, which truncates); ``k`` not a multiple of 8 packs a padded word row."""
    from heteroserve.platforms.triton.w4a16_dequant import w4a16_dequantize
    from heteroserve.platforms.triton.w4a16_pack import pack_rows

    g = _gen(k + group)
    n, groups = 72, (8 if ragged else -(-k // group))
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (groups, n), generator=g).to(torch.float16)
    scales = (torch.rand(groups, n, generator=g) / 7 + 0.01).to(torch.float16)
    rows = torch.randint(0, groups, (k,), generator=g) if ragged else torch.arange(k) // group
    ref = (q.double() - zeros.double()[rows]) * scales.double()[rows]
    out = w4a16_dequantize(pack_rows(q).to(device), zeros.to(device), scales.to(device), k,
                           group or k, rows.to(torch.int32).to(device) if ragged else None, dtype)
    assert out.shape == (k, n) and out.dtype == dtype
    if device.type == "cpu" and dtype == torch.bfloat16:  # the interpreter truncates to bf16
        assert torch.allclose(out.double(), ref, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(out.cpu(), ref.to(dtype))
