"""Linear methods: quantized schemes against dequantize-then-quantized-activation references,
4-bit packers against an independent bit-level unpacker."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from heteroserve.core.kernels.linear import AWQ_ORDER, LinearShape
from heteroserve.platforms.cpu import linear as L
from heteroserve.platforms.cpu import quant_pack as qp

FP8 = torch.float8_e4m3fn


def _layer(method: L.LinearMethod, shape: LinearShape, tensors: dict[str, torch.Tensor]
           ) -> torch.nn.Module:
    """Load ``tensors`` as the method's checkpoint parameters, checking them against its specs."""
    layer = torch.nn.Module()
    specs = method.create_weights(shape)
    assert set(specs) == set(tensors)
    for name, spec in specs.items():
        t = tensors[name]
        assert tuple(t.shape) == spec.shape and t.dtype == spec.dtype, name
        layer.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
    method.process_weights_after_loading(layer)
    return layer


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).clamp(-448, 448).to(FP8).double()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unquantized(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=gen).to(dtype)
    b = torch.randn(24, generator=gen).to(dtype)
    x = torch.randn(2, 3, 40, generator=gen).to(dtype)
    method = L.UnquantizedLinear()
    layer = _layer(method, LinearShape(40, 24, dtype), {"weight": w})
    y = method.apply(layer, x, b)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), x.double() @ w.double().T + b.double(),
                               atol=tol * 10, rtol=tol)


def _x(tokens: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 30  # an outlier column: per-tensor and per-group scales differ a lot
    return x


@pytest.mark.parametrize("tokens", [1, 5])
def test_fp8_per_tensor(tokens: int) -> None:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    x, bias = _x(tokens, 64, 2), torch.randn(48)
    qw, sw = qp.quantize_fp8_per_tensor(w)
    assert qw.dtype == FP8 and sw.shape == (1,)
    method = L.Fp8PerTensorLinear()
    layer = _layer(method, LinearShape(64, 48, torch.float32),
                   {"weight": qw, "weight_scale": sw})
    y = method.apply(layer, x, bias)
    w_deq = qw.double() * sw.double()
    sx = max(x.abs().max().item() / 448, 1e-12)
    ref_q = _fp8_round(x / sx) * sx @ w_deq.T + bias.double()
    ref_float = x.double() @ w_deq.T + bias.double()
    assert _rel_err(y, ref_q) < 1e-6 < 1e-3 < _rel_err(y, ref_float)


@pytest.mark.parametrize("n,k,tokens", [(200, 300, 3), (256, 128, 1)])
def test_fp8_block(n: int, k: int, tokens: int) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    w[:128, :128] *= 20  # blocks with different scales
    x = _x(tokens, k, 4).to(torch.bfloat16)
    qw, s = qp.quantize_fp8_block(w)
    assert s.shape == (-(-n // 128), -(-k // 128))
    w_deq = torch.zeros(n, k, dtype=torch.float64)
    for i in range(n):
        for g in range(s.shape[1]):
            w_deq[i, g * 128:(g + 1) * 128] = qw[i, g * 128:(g + 1) * 128].double() * s[i // 128, g]
    assert _rel_err(w_deq, w.double()) < 0.05
    method = L.Fp8BlockLinear()
    layer = _layer(method, LinearShape(k, n, torch.bfloat16),
                   {"weight": qw, "weight_scale_inv": s})
    y = method.apply(layer, x)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, n)
    x_deq = torch.zeros(tokens, k, dtype=torch.float64)
    for t in range(tokens):
        for g in range(0, k, 128):
            seg = x[t, g:g + 128].double()
            sx = max(seg.abs().max().item() / 448, 1e-12)
            x_deq[t, g:g + 128] = _fp8_round(seg / sx) * sx
    ref_q, ref_float = x_deq @ w_deq.T, x.double() @ w_deq.T
    assert _rel_err(y, ref_q) < 5e-3  # bf16 output rounding
    assert _rel_err(y.float(), ref_q) < _rel_err(y.float(), ref_float) / 3


@pytest.mark.parametrize("tokens", [1, 6])
def test_int8_w8a8(tokens: int) -> None:
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(5))
    x = _x(tokens, 96, 6)
    qw, sw = qp.quantize_int8_per_channel(w)
    assert qw.dtype == torch.int8 and sw.shape == (40, 1)
    assert _rel_err(qw.double() * sw.double(), w.double()) < 0.01
    method = L.Int8W8A8Linear()
    layer = _layer(method, LinearShape(96, 40, torch.float32), {"weight": qw, "weight_scale": sw})
    y = method.apply(layer, x)
    w_deq = qw.double() * sw.double()
    sx = (x.double().abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    x_deq = torch.round(x.double() / sx).clamp(-128, 127) * sx
    assert _rel_err(y, x_deq @ w_deq.T) < 1e-6 < 1e-3 < _rel_err(y, x.double() @ w_deq.T)


# -- 4-bit ------------------------------------------------------------------------------------
def _nibble(word: int, j: int) -> int:
    return ((word & 0xFFFFFFFF) >> (4 * j)) & 0xF


def _awq_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group: int) -> torch.Tensor:
    k, words = qweight.shape
    w = torch.zeros(words * 8, k, dtype=torch.float64)
    for kk in range(k):
        for wi in range(words):
            for j in range(8):
                n = 8 * wi + AWQ_ORDER[j]
                q = _nibble(int(qweight[kk, wi]), j)
                z = _nibble(int(qzeros[kk // group, wi]), j)
                w[n, kk] = (q - z) * float(scales[kk // group, n])
    return w


def _gptq_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor) -> torch.Tensor:
    words, n = qweight.shape
    w = torch.zeros(n, words * 8, dtype=torch.float64)
    for wi in range(words):
        for j in range(8):
            kk = 8 * wi + j
            g = int(g_idx[kk])
            for nn in range(n):
                q = _nibble(int(qweight[wi, nn]), j)
                z = _nibble(int(qzeros[g, nn // 8]), nn % 8) + 1
                w[nn, kk] = (q - z) * float(scales[g, nn])
    return w


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_awq(group: int, dtype: torch.dtype) -> None:
    n, k = 24, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(group))
    qweight, qzeros, scales = qp.pack_awq(w, group)
    w_deq = _awq_dequant(qweight, qzeros, scales, group)
    assert _rel_err(w_deq, w.double()) < 0.15  # it is a real 4-bit quantization of w
    method = L.AwqW4A16Linear()
    layer = _layer(method, LinearShape(k, n, dtype, group_size=group),
                   {"qweight": qweight, "qzeros": qzeros, "scales": scales})
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9)).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = method.apply(layer, x, bias)
    assert y.dtype == dtype
    ref = x.double() @ w_deq.T + bias.double()
    assert _rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("act_order,sym", [(False, True), (True, True), (True, False)])
def test_gptq(act_order: bool, sym: bool) -> None:
    n, k, group = 16, 64, 16
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(11))
    w[:, 5] *= 10
    qweight, qzeros, scales, g_idx = qp.pack_gptq(w, group, act_order=act_order, sym=sym)
    assert qweight.shape == (k // 8, n) and qzeros.shape == (k // group, n // 8)
    assert g_idx.dtype == torch.int32 and torch.bincount(g_idx.long()).tolist() == [group] * 4
    assert act_order == (not torch.equal(g_idx.long(), torch.arange(k) // group))
    w_deq = _gptq_dequant(qweight, qzeros, scales, g_idx)
    assert _rel_err(w_deq, w.double()) < 0.15
    method = L.GptqW4A16Linear()
    tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    if act_order:
        tensors["g_idx"] = g_idx
    layer = _layer(method, LinearShape(k, n, torch.float32, group_size=group,
                                       has_g_idx=act_order), tensors)
    x = torch.randn(1, 2, k, generator=torch.Generator().manual_seed(12))
    y = method.apply(layer, x)
    assert y.shape == (1, 2, n)
    assert _rel_err(y, x.double() @ w_deq.T) < 1e-6


def test_w4_roundtrip_matches_quantizer() -> None:
    """Unpacking what the packer wrote gives back the quantizer's own integers."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    q, zeros, _ = qp.quantize_w4(w, 16, sym=False)
    qweight, qzeros, _ = qp.pack_awq(w, 16)
    assert torch.equal(qp.unpack_nibbles(qweight, AWQ_ORDER).long(), q)
    assert torch.equal(qp.unpack_nibbles(qzeros, AWQ_ORDER).long(), zeros)


@pytest.mark.parametrize("method,shape,match", [
    (L.AwqW4A16Linear(), LinearShape(100, 64, torch.float16, group_size=64), "group size"),
    (L.AwqW4A16Linear(), LinearShape(128, 60, torch.float16, group_size=64), "output size"),
    (L.GptqW4A16Linear(), LinearShape(128, 60, torch.float16, group_size=32), "output size"),
])
def test_create_weights_errors(method: L.LinearMethod, shape: LinearShape, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        method.create_weights(shape)


def test_apply_checks_input_size() -> None:
    method = L.Int8W8A8Linear()
    qw, sw = qp.quantize_int8_per_channel(torch.randn(8, 16))
    layer = _layer(method, LinearShape(16, 8, torch.float32), {"weight": qw, "weight_scale": sw})
    with pytest.raises(ValueError, match="expects 16"):
        method.apply(layer, torch.zeros(2, 15))


def test_registered_names_resolve() -> None:
    from heteroserve.core.kernels.linear import LINEAR_SCHEMES
    from heteroserve.platforms.cpu.plugin import TORCH_NATIVE
    for scheme in LINEAR_SCHEMES:
        module, attr = TORCH_NATIVE[f"linear.{scheme}"]
        assert getattr(L, attr).scheme == scheme


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prepacked_packs_where_onednn_runs_the_dtype(dtype: torch.dtype) -> None:
    from heteroserve.platforms.cpu.features import detect_cpu_features

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=gen).to(dtype)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    method = L.OneDNNPrepackedLinear()
    layer = _layer(method, LinearShape(64, 48, dtype), {"weight": w.clone()})
    assert layer.weight.is_mkldnn == (dtype in detect_cpu_features().prepack_dtypes())
    for rows in (x[:1], x, x.t().contiguous().t()):  # one row, several, a strided input
        y = method.apply(layer, rows)
        assert y.dtype == dtype and y.shape == (rows.shape[0], 48)
        if dtype == torch.float32:  # one fp32 accumulation either way, order may differ
            torch.testing.assert_close(y, torch.nn.functional.linear(rows, w))
        else:  # bf16/fp16: one rounding of the fp32 accumulation
            torch.testing.assert_close(y, torch.nn.functional.linear(rows, w), atol=0, rtol=1e-2)


def test_prepacked_keeps_the_weight_without_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    from heteroserve.platforms.cpu import prepack
    from heteroserve.platforms.cpu.features import CpuFeatures

    absent = CpuFeatures(isa="DEFAULT", avx512=False, avx512_bf16=False, amx_bf16=False,
                         onednn=False, mkl=False, onednn_bf16=False, onednn_fp16=False)
    monkeypatch.setattr(prepack, "detect_cpu_features", lambda: absent)
    assert absent.prepack_dtypes() == () and "off" in absent.describe()["onednn_prepack"]
    w = torch.randn(8, 16)
    method = L.OneDNNPrepackedLinear()
    layer = _layer(method, LinearShape(16, 8, torch.float32), {"weight": w.clone()})
    assert not layer.weight.is_mkldnn
    x = torch.randn(3, 16)
    torch.testing.assert_close(method.apply(layer, x), x @ w.T)


def test_prepacked_declines_dtypes_onednn_emulates() -> None:
    from heteroserve.core.kernels.registry import KernelRequest
    from heteroserve.platforms.cpu.features import detect_cpu_features

    request = KernelRequest(platform="cpu", device_type="cpu", dtype=torch.float32)
    assert L.supports_prepacked(request)
    for dtype in (torch.bfloat16, torch.float16):
        answer = L.supports_prepacked(dataclasses.replace(request, dtype=dtype))
        assert bool(answer) == (dtype in detect_cpu_features().prepack_dtypes()), answer.reason
