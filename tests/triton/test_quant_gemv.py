"""The decode GEMVs of the quantized schemes against the float64 oracles of conformance:
W8A8 (fp8 per-tensor / per-channel / 128x128 block, int8 per-channel) with the activation
quantized in-kernel, and W4A16 (AWQ, GPTQ) unpacking nibbles in registers; ragged K and N,
1 to 4 rows, bias; and the linear methods sending few rows to them. The fp8 weights load in
the interpreter (fp8 -> fp32 is exact there); the kernel's fp8 rounding of the activation is
integer arithmetic, checked here against torch's cast on every fp8 value and its midpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import triton
import triton.language as tl
from triton_refs import rel_err

from heteroserve.conformance import quantize
from heteroserve.conformance.oracles import linear as oracle
from heteroserve.core.kernels.linear import LinearShape
from heteroserve.platforms.triton import w8_gemv as w8

FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@triton.jit
def _round_kernel(v_ptr, o_ptr, n, MIN_NORMAL: tl.constexpr, SUB_MAGIC: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n, other=0.0)
    tl.store(o_ptr + offs, w8.round_fp8(v, MIN_NORMAL, SUB_MAGIC), mask=offs < n)


@pytest.mark.parametrize("fp8", FP8)
def test_round_fp8_matches_torch_cast(device: torch.device, fp8: torch.dtype) -> None:
    """Every finite fp8 value, the midpoints between neighbours (ties to even) and points
    just either side of them round as torch's round-to-nearest-even cast does."""
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[grid.isfinite()].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    v = torch.cat([grid, mid, mid * (1 + 2**-20), mid * (1 - 2**-20),
                   torch.randn(4000, generator=_gen(0)) * 50]).clamp(-grid.max(), grid.max())
    out = torch.empty_like(v)
    smallest, magic = w8._fp8_constants(fp8)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v.to(device), out_dev := out.to(device),
                                                   v.numel(), MIN_NORMAL=smallest,
                                                   SUB_MAGIC=magic, BLOCK=1024)
    assert torch.equal(out_dev.cpu(), v.to(fp8).float())


_W8 = {
    "fp8_per_tensor": (quantize.quantize_fp8_per_tensor, w8.ACT_TENSOR, w8.WS_TENSOR,
                       "weight_scale"),
    "fp8_per_channel": (quantize.quantize_fp8_per_channel, w8.ACT_ROW, w8.WS_CHANNEL,
                        "weight_scale"),
    "fp8_block": (quantize.quantize_fp8_block, w8.ACT_GROUP, w8.WS_BLOCK, "weight_scale_inv"),
    "int8_w8a8": (lambda w, _dt: quantize.quantize_int8_per_channel(w), w8.ACT_ROW,
                  w8.WS_CHANNEL, "weight_scale"),
}


def _activations(gen: torch.Generator, rows: int, k: int, scheme: str,
                 fp8: torch.dtype) -> torch.Tensor:
    return quantize.w8a8_activations(gen, rows, k, scheme, torch.float32,
                                     None if scheme == "int8_w8a8" else fp8)


@pytest.mark.parametrize("scheme", list(_W8))
@pytest.mark.parametrize("rows,k,n,bias", [(1, 320, 200, True), (3, 256, 64, False),
                                           (4, 200, 40, False)])
def test_w8_gemv_against_float64(device: torch.device, scheme: str, rows: int, k: int,
                                 n: int, bias: bool) -> None:
    """fp32 activations, so the only error is fp32 accumulation: ragged K (not a multiple
    of 128) and N (not of the tile), the even path (256 x 64), several rows."""
    make, act, ws, scale_name = _W8[scheme]
    fp8 = torch.float8_e4m3fn
    g = _gen(rows * 1000 + k + n)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    ckpt = make(w, fp8)
    x = _activations(g, rows, k, scheme, fp8)
    b = torch.randn(n, generator=g) if bias else None
    scale = ckpt[scale_name].float()
    scale = scale.reshape(-1) if ws != w8.WS_BLOCK else scale.contiguous()
    qmax = 127.0 if scheme == "int8_w8a8" else 448.0
    out = w8.w8_gemv(x.to(device), ckpt["weight"].to(device), scale.to(device), act, ws, qmax,
                     torch.float32, b.to(device) if b is not None else None)
    ref = oracle.linear(scheme, x, ckpt, 128, b, fp8)
    assert out.shape == (rows, n) and rel_err(out, ref) < 2e-6


@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_per_tensor"])
def test_w8_gemv_l2_prefetch_changes_nothing(device: torch.device, scheme: str) -> None:
    """``prefetch_l2`` (the next tiles' lines asked of the L2 before the PDL wait, clamped
    to the ragged last row and column) gives the same product."""
    make, act, ws, scale_name = _W8[scheme]
    fp8 = torch.float8_e4m3fn
    g = _gen(7)
    n, k = 40, 520
    ckpt = make(torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5, fp8)
    x = _activations(g, 1, k, scheme, fp8).to(device)
    scale = ckpt[scale_name].float()
    scale = (scale.reshape(-1) if ws != w8.WS_BLOCK else scale.contiguous()).to(device)
    cfg = w8.choose_w8_config(n, k, 1, device, act)
    out = [w8.w8_gemv(x, ckpt["weight"].to(device), scale, act, ws, 448.0, torch.float32,
                      config=replace(cfg, prefetch_l2=pf)) for pf in (False, True)]
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def test_w8_gemv_fnuz_block(device: torch.device) -> None:
    """e4m3fnuz weights (max 240, one more binade of subnormals) quantize x onto their grid
    (the flavour of AMD GPUs: interpreted on the cpu; NVIDIA's Triton has no e4m3fnuz)."""
    if device.type == "cuda" and torch.version.hip is None:
        pytest.skip("e4m3fnuz does not compile for NVIDIA GPUs (AMD's fp8 flavour)")
    fp8 = torch.float8_e4m3fnuz
    g = _gen(7)
    w = torch.randn(136, 384, generator=g, dtype=torch.float64) / 20
    ckpt = quantize.quantize_fp8_block(w, fp8)
    x = quantize.w8a8_activations(g, 2, 384, "fp8_block", torch.float32, fp8)
    out = w8.w8_gemv(x.to(device), ckpt["weight"].to(device),
                     ckpt["weight_scale_inv"].to(device), w8.ACT_GROUP, w8.WS_BLOCK, 240.0,
                     torch.float32)
    assert rel_err(out, oracle.linear("fp8_block", x, ckpt, 128, None, fp8)) < 2e-6


def test_w8_gemv_quantizes_the_activation(device: torch.device) -> None:
    """Not a bf16-activation GEMV in disguise: a row with one large outlier loses the small
    values to fp8 rounding exactly as the oracle says, far from the unquantized product."""
    fp8 = torch.float8_e4m3fn
    k, n = 256, 32
    w = torch.randn(n, k, generator=_gen(3), dtype=torch.float64)
    w[:, 0] = 0  # the outlier only sets the scale
    ckpt = quantize.quantize_fp8_per_channel(w, fp8)
    x = torch.full((1, k), 0.01)
    x[0, 0] = 448.0 * 4  # scale 4: 0.01 / 4 rounds to 2**-9, 0.0078 after scaling
    out = w8.w8_gemv(x.to(device), ckpt["weight"].to(device),
                     ckpt["weight_scale"].reshape(-1).to(device), w8.ACT_ROW, w8.WS_CHANNEL,
                     448.0, torch.float32)
    ref = oracle.linear("fp8_per_channel", x, ckpt, 128, None, fp8)
    plain = x.double() @ oracle.dequantize("fp8_per_channel", ckpt, 128).T
    assert rel_err(out, ref) < 1e-6 and rel_err(plain.float(), ref) > 0.1


def test_w8_gemv_rejects_bad_shapes(device: torch.device) -> None:
    x = torch.randn(1, 64, device=device)
    w = torch.zeros(32, 64, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="agree on K"):
        w8.w8_gemv(x[:, :32], w, torch.ones(32, device=device), w8.ACT_ROW, w8.WS_CHANNEL,
                   127.0, torch.float32)
    with pytest.raises(ValueError, match="weight scale"):
        w8.w8_gemv(x, w, torch.ones(31, device=device), w8.ACT_ROW, w8.WS_CHANNEL, 127.0,
                   torch.float32)


def _w4_reference(x: torch.Tensor, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                  group: int) -> torch.Tensor:
    g = torch.arange(q.shape[0]) // group
    w = (q.double() - zeros.double()[g]) * scales.double()[g]  # [K, N]
    return x.double() @ w


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("nibble", ["subnormal", "exponent"])
@pytest.mark.parametrize("rows,k,n,group,x_scale", [
    (1, 100, 40, 32, 1.0), (2, 200, 24, 32, 1.0), (4, 128, 32, 64, 1.0), (1, 256, 16, 256, 1.0),
    (1, 192, 16, 24, 1.0), (2, 128, 16, 32, 2.0 ** 30), (2, 128, 16, 32, 2.0 ** -50)])
def test_w4a16_gemv_against_float64(device: torch.device, rows: int, k: int, n: int,
                                    group: int, x_scale: float, nibble: str,
                                    prefetch: bool) -> None:
    """Every nibble position with codes 0..15 and zero points 0..15 (so each decoding is
    checked at each shift): ragged K (not a multiple of 8 or of the tile), N not a multiple
    of the tile, one group over all of K, a group of 3 words (not a power of two), and
    activations near both ends of the subnormal decoding's range; with the next tile's loads
    issued ahead (``prefetch``) and without."""
    from heteroserve.platforms.triton.w4a16_gemv import W4GemvConfig, w4a16_gemv
    from heteroserve.platforms.triton.w4a16_pack import pack_rows

    g = _gen(rows + k + n)
    groups = -(-k // group)
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (groups, n), generator=g).to(torch.float16)
    scales = (torch.rand(groups, n, generator=g) / 8 + 0.01).to(torch.float16)
    x = torch.randn(rows, k, generator=g) * x_scale
    bias = torch.randn(n, generator=g) * x_scale
    config = W4GemvConfig(16, 8, 1, 1, nibble, prefetch) if device.type == "cpu" else None
    if config is None and (nibble != "subnormal" or prefetch):
        config = W4GemvConfig(16, 64, 4, 1, nibble, prefetch)
    out = w4a16_gemv(x.to(device), pack_rows(q).to(device), zeros.to(device),
                     scales.to(device), group, bias.to(device), config=config)
    ref = _w4_reference(x, q, zeros, scales, group) + bias.double()
    assert out.shape == (rows, n) and rel_err(out, ref) < 2e-6


@pytest.mark.parametrize("nibble", ["subnormal", "exponent"])
def test_w4a16_gemv_bf16_rule_tile_and_non_finite_x(device: torch.device, nibble: str) -> None:
    """bf16 activations through a tile of the launch rule's form (8 columns of 4 word rows a
    thread, several steps of K, group 128): within bf16 rounding of the float64 product; a
    NaN or inf in ``x`` reaches every output instead of vanishing."""
    from heteroserve.platforms.triton.w4a16_gemv import W4GemvConfig, w4a16_gemv
    from heteroserve.platforms.triton.w4a16_pack import pack_rows

    g = _gen(7)
    k, n, group = 2048, 32, 128
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(0, 16, (k // group, n), generator=g).to(torch.float16)
    scales = (torch.rand(k // group, n, generator=g) / 8 + 0.01).to(torch.float16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    args = (pack_rows(q).to(device), zeros.to(device), scales.to(device), group)
    config = W4GemvConfig(16, 64, 1, 1, nibble)
    out = w4a16_gemv(x.to(device), *args, config=config)
    ref = _w4_reference(x.float(), q, zeros, scales, group)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    ahead = w4a16_gemv(x.to(device), *args, config=W4GemvConfig(16, 64, 1, 1, nibble, True))
    assert torch.equal(ahead, out)  # the same products in the same order
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[0, 1000] = bad
        out = w4a16_gemv(xb.to(device), *args, config=config).float()
        assert not torch.isfinite(out).any(), bad


def test_w4a16_decoding_follows_the_subnormal_check(device: torch.device,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The check passes on this device (subnormals kept), fails against a kernel that
    flushes them (the subnormal decoding's nibbles 0..4 lost), and the launch shape follows
    its answer."""
    from heteroserve.platforms.triton import w4a16_gemv as w4

    monkeypatch.setattr(w4, "_KEEPS_SUBNORMALS", {})
    assert w4.keeps_subnormals(device)
    assert w4.choose_w4_config(64, 256, 1, device).nibble == w4.NIBBLE_SUBNORMAL

    def flushing(x, qweight, zeros, scales, group, config):
        if config.nibble == w4.NIBBLE_SUBNORMAL:
            qweight = qweight & ~0xFFFFF  # what a flushing backend would see of nibbles 0..4
        return w4.w4a16_gemv(x, qweight, zeros, scales, group, config=config)

    monkeypatch.setattr(w4, "_KEEPS_SUBNORMALS", {})
    assert not w4.keeps_subnormals(device, flushing)
    assert w4.choose_w4_config(64, 256, 1, device).nibble == w4.NIBBLE_EXPONENT


def _layer(method: object, shape: LinearShape, ckpt: dict[str, torch.Tensor],
           device: torch.device) -> torch.nn.Module:
    layer = torch.nn.Module()
    for name, spec in method.create_weights(shape).items():  # type: ignore[attr-defined]
        assert (tuple(spec.shape), spec.dtype) == (tuple(ckpt[name].shape), ckpt[name].dtype)
        layer.register_parameter(name, torch.nn.Parameter(ckpt[name].to(device),
                                                          requires_grad=False))
    method.process_weights_after_loading(layer)  # type: ignore[attr-defined]
    return layer


def _spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


_METHODS = {"fp8_per_tensor": "Fp8PerTensorLinear", "fp8_per_channel": "Fp8PerChannelLinear",
            "fp8_block": "Fp8BlockLinear", "int8_w8a8": "Int8W8A8Linear"}


@pytest.mark.parametrize("scheme", list(_METHODS))
def test_w8a8_linear_sends_decode_rows_to_the_gemv(device: torch.device, scheme: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``apply`` on ``[2, 2, K]`` (4 rows) runs the GEMV and matches the oracle; int8 with 7
    rows runs the GEMM (fp8's GEMM needs a GPU: the activation cast of ``quantize_rows``)."""
    from heteroserve.platforms.triton import linear_w8a8

    fp8 = torch.float8_e4m3fn
    calls = _spy(monkeypatch, linear_w8a8, "w8_gemv")
    method = getattr(linear_w8a8, _METHODS[scheme])()
    k, n = 320, 136
    g = _gen(len(scheme))
    ckpt = _W8[scheme][0](torch.randn(n, k, generator=g, dtype=torch.float64) / 16, fp8)
    layer = _layer(method, LinearShape(k, n, torch.float32), ckpt, device)
    for t in (4, 7) if scheme == "int8_w8a8" else (4,):
        x = _activations(g, t, k, scheme, fp8)
        bias = torch.randn(n, generator=g)
        x_in = x.view(2, t // 2, k) if t == 4 else x
        out = method.apply(layer, x_in.to(device), bias.to(device))
        ref = oracle.linear(scheme, x, ckpt, 128, bias, fp8)
        assert rel_err(out.reshape(t, n), ref) < 2e-6
    assert calls == [4]


@pytest.mark.parametrize("scheme", ["awq", "gptq"])
def test_w4a16_linear_sends_decode_rows_to_the_gemv(device: torch.device, scheme: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """AWQ and GPTQ (act-order by permutation) ``apply``: 1 and 3 rows through the GEMV, 9
    through the GEMM, 12 and 17 (from ``W4_DEQUANT_MIN_ROWS``, lowered to 12 here) through
    the dequantized weight and the BLAS GEMM, all equal to the oracle."""
    from heteroserve.platforms.triton import linear_w4a16

    calls = _spy(monkeypatch, linear_w4a16, "w4a16_gemv")
    gemm_calls = _spy(monkeypatch, linear_w4a16, "w4a16_gemm")
    dequant_calls = _spy(monkeypatch, linear_w4a16, "w4a16_dequantize")
    monkeypatch.setattr(linear_w4a16, "W4_DEQUANT_MIN_ROWS", 12)
    k, n, group = 128, 40, 64
    g = _gen(11)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / 16
    if scheme == "awq":
        ckpt, method, g_idx = quantize.pack_awq(w, group), linear_w4a16.AwqW4A16Linear(), None
    else:
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[torch.randperm(k, generator=g)] = torch.arange(k) // group
        ckpt, method = quantize.pack_gptq(w, group, g_idx), linear_w4a16.GptqW4A16Linear()
    layer = _layer(method, LinearShape(k, n, torch.float32, group, g_idx is not None), ckpt,
                   device)
    for t in (1, 3, 9, 12, 17):
        x = torch.randn(t, k, generator=g)
        bias = torch.randn(n, generator=g)
        out = method.apply(layer, x.to(device), bias.to(device))
        ref = oracle.linear(f"{scheme}_w4a16", x, ckpt, group, bias, None)
        assert rel_err(out, ref) < 2e-6
    assert calls == [1, 3] and gemm_calls == [9] and dequant_calls == [k // 8] * 2


@pytest.mark.parametrize("config,scheme,kernel", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
      "version": "gemm"}, "awq_w4a16", "4-bit GEMV for <= 4 rows"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {
        "g": {"targets": ["Linear"],
              "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                          "strategy": "channel"},
              "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                    "strategy": "token", "dynamic": True}}}},
     "int8_w8a8", "int8 GEMV (x quantized in-kernel) for <= 4 rows"),
])
def test_startup_block_names_the_cuda_decode_kernel(config: dict, scheme: str,
                                                    kernel: str) -> None:
    """The start-up block's quantization lines on the cuda platform name the GEMV that the
    scheme's decode rows run on (fp8 needs an fp8-capable GPU to resolve there)."""
    from heteroserve.core.kernels.dispatch import resolve_all
    from heteroserve.core.kernels.registry import KernelRequest
    from heteroserve.core.model_runner.build import linear_schemes, quantization_lines
    from heteroserve.core.plugins.manager import load_plugins
    from heteroserve.core.quantization import detect_quantization

    quant = detect_quantization({"quantization_config": config}, None)
    request = KernelRequest(platform="cuda", device_type="cuda", dtype=torch.bfloat16,
                            head_size=128, num_q_heads=8, num_kv_heads=2, page_size=16,
                            quant_scheme=scheme)
    resolutions = resolve_all(load_plugins().registry, request, {}, linear_schemes(quant))
    text = "\n".join(quantization_lines(quant, resolutions))
    assert f"{scheme:<20} -> triton (native): Triton: {kernel}" in text


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")
@pytest.mark.parametrize("scheme", list(_W8) + ["awq", "gptq"])
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_gemv_equals_gemm_path_and_graph_replay(scheme: str, rows: int) -> None:
    """On the GPU, bf16 activations: the GEMV path of ``apply`` equals the GEMM path (the
    same activation quantization; fp8 by the hardware cast there) up to bf16 rounding of
    the output, and replaying it from a CUDA graph gives the eager result bit for bit."""
    from heteroserve.platforms.triton import linear_w4a16, linear_w8a8

    dev = torch.device("cuda")
    k, n = 4096 + 384, 1000  # ragged against the 1024-column tile and the 16-row one
    g = _gen(rows)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k ** 0.5
    if scheme in _W8:
        ckpt = _W8[scheme][0](w, torch.float8_e4m3fn)
        method = getattr(linear_w8a8, _METHODS[scheme])()
        module, limit = linear_w8a8, "W8_GEMV_MAX_ROWS"
        shape = LinearShape(k, n, torch.bfloat16)
    else:
        ckpt = (quantize.pack_awq(w, 128) if scheme == "awq" else quantize.pack_gptq(w, 128, None))
        method = (linear_w4a16.AwqW4A16Linear() if scheme == "awq"
                  else linear_w4a16.GptqW4A16Linear())
        module, limit = linear_w4a16, "W4_GEMV_MAX_ROWS"
        shape = LinearShape(k, n, torch.bfloat16, 128)
    layer = _layer(method, shape, ckpt, dev)
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16).to(dev)
    bias = torch.randn(n, generator=g).to(torch.bfloat16).to(dev)
    eager = method.apply(layer, x, bias)
    saved = getattr(module, limit)
    setattr(module, limit, 0)
    try:
        gemm = method.apply(layer, x, bias)
    finally:
        setattr(module, limit, saved)
    assert rel_err(eager.float(), gemm.double()) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = method.apply(layer, x, bias)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, eager)
