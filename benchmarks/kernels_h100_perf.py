"""Timings of the Triton kernels on a GPU (used by kernels_h100.py).

Each entry returns rows ``{"name", "ms", "metric", ...}``: ``ms`` is the median of
``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repetitions, L2 flushed between them);
``metric`` is achieved bandwidth (bytes each input read once + each output written once) or
TFLOP/s, whichever bounds the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from triton.testing import do_bench

from heteroserve.conformance.paged import build_batch
from heteroserve.core.kernels.attention import AttentionConfig, AttentionLayer, ForwardMode
from heteroserve.core.kernels.linear import LinearShape
from heteroserve.core.kernels.ops import SamplingBatch

DEV = torch.device("cuda")
BF = torch.bfloat16
Row = dict[str, Any]


def ms_of(fn: Callable[[], Any]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def gbps(nbytes: float, ms: float) -> str:
    return f"{nbytes / ms / 1e6:.0f} GB/s"


def tflops(flops: float, ms: float) -> str:
    return f"{flops / ms / 1e9:.1f} TFLOP/s"


def attention_setup(backend_cls: type, mode: ForwardMode, seqs: tuple[tuple[int, int], ...],
                    hq: int = 32, hk: int = 8, d: int = 128, page: int = 16,
                    dtype: torch.dtype = BF) -> tuple[Callable[[], Any], Any]:
    """A no-argument callable running ``backend.extend/decode`` on random data (KV already
    written), and the metadata."""
    batch = build_batch(seqs, page, mode, DEV, torch.Generator().manual_seed(0), spare_pages=0)
    meta = batch.meta
    backend = backend_cls(AttentionConfig(hq, hk, d, page, dtype, DEV, max_batch_size=512,
                                          max_context_len=32768))
    shape = backend.kv_cache_shape(batch.num_pages)
    kc = torch.randn(shape, device=DEV, dtype=dtype)
    vc = torch.randn(shape, device=DEV, dtype=dtype)
    q = torch.randn(meta.num_tokens, hq, d, device=DEV, dtype=dtype)
    layer = AttentionLayer(0, d ** -0.5)
    backend.prepare(meta)
    run = backend.decode if mode is ForwardMode.DECODE else backend.extend
    return (lambda: run(q, kc, vc, layer, meta)), meta


def perf_attention() -> list[Row]:
    from heteroserve.platforms.triton.attention import TritonAttention

    rows: list[Row] = []
    hq, hk, d = 32, 8, 128
    for b, ctx in ((1, 1024), (1, 32768), (32, 1024), (32, 8192), (128, 2048), (256, 4096)):
        fn, _ = attention_setup(TritonAttention, ForwardMode.DECODE, ((ctx - 1, 1),) * b)
        ms = ms_of(fn)
        kv_bytes = 2 * b * ctx * hk * d * 2
        rows.append({"name": f"triton decode B{b} ctx{ctx} Hq32/Hk8 D128 bf16", "ms": ms,
                     "metric": gbps(kv_bytes, ms), "kv_bytes": kv_bytes})
    for seqs, label in ((((0, 4096),), "1x4096 prefill"), (((0, 1024),) * 8, "8x1024 prefill"),
                        (((3072, 1024),), "chunk 1024 on 3072 prefix"),
                        (((0, 16384),), "1x16384 prefill")):
        fn, meta = attention_setup(TritonAttention, ForwardMode.EXTEND, seqs)
        ms = ms_of(fn)
        pairs = sum(n * p + n * (n + 1) / 2 for p, n in seqs)  # causal (q, k) pairs
        flops = 4 * pairs * hq * d
        rows.append({"name": f"triton extend {label} Hq32/Hk8 D128 bf16", "ms": ms,
                     "metric": tflops(flops, ms)})
    for n in (4096, 16384):  # dense causal SDPA (FlashAttention-2 in torch) as a yardstick
        q = torch.randn(1, hq, n, d, device=DEV, dtype=BF)
        k = torch.randn(1, hk, n, d, device=DEV, dtype=BF)
        v = torch.randn(1, hk, n, d, device=DEV, dtype=BF)
        ms = ms_of(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True))
        rows.append({"name": f"torch SDPA causal dense 1x{n} (baseline)", "ms": ms,
                     "metric": tflops(4 * n * (n + 1) / 2 * hq * d, ms)})
    return rows


def perf_moe() -> list[Row]:
    from heteroserve.platforms.cpu import moe as native
    from heteroserve.platforms.triton.moe import fused_moe, topk_softmax

    rows: list[Row] = []
    e, k, h, inter = 8, 2, 4096, 14336  # Mixtral-8x7B layer
    w13 = torch.randn(e, 2 * inter, h, device=DEV, dtype=BF) * 0.02
    w2 = torch.randn(e, h, inter, device=DEV, dtype=BF) * 0.02
    wbytes = (w13.numel() + w2.numel()) * 2
    for t in (1, 32, 512, 4096):
        x = torch.randn(t, h, device=DEV, dtype=BF)
        tw, tid = topk_softmax(torch.randn(t, e, device=DEV), k, True)
        ms = ms_of(lambda: fused_moe(x, w13, w2, tw, tid))
        flops = 2 * t * k * (2 * inter * h + h * inter)
        used = min(e, t * k)
        rows.append({"name": f"triton fused_moe T{t} E8 k2 H4096 I14336 bf16", "ms": ms,
                     "metric": f"{tflops(flops, ms)}, {gbps(wbytes * used / e, ms)} weights"})
        if t in (32, 512):
            ms_n = ms_of(lambda: native.fused_moe(x, w13, w2, tw, tid))
            rows.append({"name": f"torch-native fused_moe T{t} (baseline)", "ms": ms_n,
                         "metric": tflops(flops, ms_n)})
    logits = torch.randn(4096, 64, device=DEV)
    rows.append({"name": "triton moe_topk_softmax T4096 E64 k6",
                 "ms": ms_of(lambda: topk_softmax(logits, 6, True)), "metric": ""})
    return rows


def _linear_layer(method: Any, k: int, n: int, scheme: str) -> torch.nn.Module:
    from heteroserve.conformance import quantize

    w = torch.randn(n, k, dtype=torch.float64) * k ** -0.5
    if scheme == "fp8_per_tensor":
        ckpt = quantize.quantize_fp8_per_tensor(w, torch.float8_e4m3fn)
    elif scheme == "fp8_block":
        ckpt = quantize.quantize_fp8_block(w, torch.float8_e4m3fn)
    elif scheme == "int8_w8a8":
        ckpt = quantize.quantize_int8_per_channel(w)
    else:
        ckpt = quantize.pack_awq(w, 128)
    layer = torch.nn.Module()
    for name in method.create_weights(LinearShape(k, n, BF)):
        layer.register_parameter(name, torch.nn.Parameter(ckpt[name].to(DEV), requires_grad=False))
    method.process_weights_after_loading(layer)
    return layer


def perf_linear() -> list[Row]:
    from heteroserve.platforms.triton import linear_w4a16 as w4
    from heteroserve.platforms.triton import linear_w8a8 as w8

    rows: list[Row] = []
    k, n = 4096, 14336  # a Llama-3-8B MLP up projection
    weight = torch.randn(n, k, device=DEV, dtype=BF)
    methods = [("fp8_per_tensor", w8.Fp8PerTensorLinear()), ("fp8_block", w8.Fp8BlockLinear()),
               ("int8_w8a8", w8.Int8W8A8Linear()), ("awq_w4a16", w4.AwqW4A16Linear())]
    layers = {s: _linear_layer(m, k, n, s) for s, m in methods}
    for m in (1, 16, 256, 4096):
        x = torch.randn(m, k, device=DEV, dtype=BF)
        flops = 2 * m * n * k
        ms = ms_of(lambda: torch.nn.functional.linear(x, weight))
        rows.append({"name": f"linear bf16 cuBLAS M{m} K{k} N{n} (baseline)", "ms": ms,
                     "metric": f"{tflops(flops, ms)}, {gbps(n * k * 2, ms)} W"})
        for scheme, method in methods:
            layer = layers[scheme]
            ms = ms_of(lambda: method.apply(layer, x))
            wb = n * k // 2 if scheme == "awq_w4a16" else n * k
            rows.append({"name": f"linear.{scheme} M{m} K{k} N{n}", "ms": ms,
                         "metric": f"{tflops(flops, ms)}, {gbps(wb, ms)} W"})
    return rows


def perf_elementwise() -> list[Row]:
    from heteroserve.platforms.cpu import activation as nact
    from heteroserve.platforms.cpu import norm as nnorm
    from heteroserve.platforms.cpu import rotary as nrot
    from heteroserve.platforms.triton import activation, norm, rotary

    rows: list[Row] = []
    t, h = 4096, 4096
    x = torch.randn(t, h, device=DEV, dtype=BF)
    r = torch.randn(t, h, device=DEV, dtype=BF)
    w = torch.randn(h, device=DEV, dtype=BF)
    for name, fn, nbytes in (
            ("rms_norm", lambda: norm.rms_norm(x, w, 1e-6), 2 * t * h * 2),
            ("torch-native rms_norm (baseline)", lambda: nnorm.rms_norm(x, w, 1e-6), 2 * t * h * 2),
            ("fused_add_rms_norm", lambda: norm.fused_add_rms_norm(x, r, w, 1e-6), 4 * t * h * 2),
            ("torch-native fused_add_rms_norm (baseline)",
             lambda: nnorm.fused_add_rms_norm(x, r, w, 1e-6), 4 * t * h * 2)):
        ms = ms_of(fn)
        rows.append({"name": f"{name} T{t} H{h} bf16", "ms": ms, "metric": gbps(nbytes, ms)})
    g = torch.randn(t, 2 * 14336, device=DEV, dtype=BF)
    for name, fn in (("silu_and_mul", lambda: activation.silu_and_mul(g)),
                     ("torch-native silu_and_mul (baseline)", lambda: nact.silu_and_mul(g))):
        ms = ms_of(fn)
        rows.append({"name": f"{name} T{t} I14336 bf16", "ms": ms,
                     "metric": gbps(3 * t * 14336 * 2, ms)})
    q = torch.randn(t, 32, 128, device=DEV, dtype=BF)
    kk = torch.randn(t, 8, 128, device=DEV, dtype=BF)
    cache = torch.randn(32768, 128, device=DEV)
    pos = torch.randint(0, 32768, (t,), device=DEV)
    for name, fn in (("rotary neox", lambda: rotary.apply_rotary(pos, q, kk, cache, True)),
                     ("torch-native rotary (baseline)",
                      lambda: nrot.apply_rotary(pos, q, kk, cache, True))):
        ms = ms_of(fn)
        rows.append({"name": f"{name} T{t} 32/8 heads D128 bf16", "ms": ms,
                     "metric": gbps(2 * t * 40 * 128 * 2, ms)})
    return rows


def perf_sampling() -> list[Row]:
    from heteroserve.platforms.cpu import sampling as nsamp
    from heteroserve.platforms.triton.bitmask import apply_token_bitmask
    from heteroserve.platforms.triton.sampling import sample

    rows: list[Row] = []
    v = 152064
    for b in (1, 64, 256):
        logits = torch.randn(b, v, device=DEV)
        p = SamplingBatch(torch.full((b,), 0.7, device=DEV),
                          torch.full((b,), 50, device=DEV, dtype=torch.int32),
                          torch.full((b,), 0.9, device=DEV), torch.zeros(b, device=DEV),
                          torch.arange(b, device=DEV), torch.zeros(b, device=DEV, dtype=torch.long))
        g = SamplingBatch(torch.zeros(b, device=DEV), p.top_ks, p.top_ps, p.min_ps, p.seeds,
                          p.steps)
        for name, fn in (("triton sample top-k/top-p", lambda: sample(logits, p)),
                         ("triton sample greedy rows (not flagged)", lambda: sample(logits, g)),
                         ("torch-native sample top-k/top-p (baseline)",
                          lambda: nsamp.sample(logits, p))):
            rows.append({"name": f"{name} B{b} V{v}", "ms": ms_of(fn), "metric": ""})
        mask = torch.randint(-2 ** 31, 2 ** 31 - 1, (b, (v + 31) // 32), device=DEV,
                             dtype=torch.int32)
        rows.append({"name": f"triton token_bitmask_apply B{b} V{v}",
                     "ms": ms_of(lambda: apply_token_bitmask(logits, mask)), "metric": ""})
    return rows


PERF = [("attention", perf_attention), ("moe", perf_moe), ("linear", perf_linear),
        ("elementwise", perf_elementwise), ("sampling", perf_sampling)]
