"""Tile-config sweeps for the Triton kernels (used by kernels_h100.py): each candidate is timed
with do_bench and its output compared with the default config's (``err_vs_default``), so a
faster config is also a checked one. Candidates that fail to compile are recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from kernels_h100_checks import rel
from kernels_h100_perf import _linear_layer, gbps, ms_of, tflops

from heteroserve.conformance.paged import build_batch
from heteroserve.core.kernels.attention import AttentionLayer, ForwardMode
from heteroserve.core.kernels.ops import SamplingBatch

DEV = torch.device("cuda")
BF = torch.bfloat16
Row = dict[str, Any]


def _sweep(label: str, configs: list[Any], run: Callable[[Any], torch.Tensor],
           metric: Callable[[float], str]) -> list[Row]:
    rows: list[Row] = []
    ref = None
    for cfg in configs:
        try:
            out = run(cfg)
            if ref is None:
                ref = out.clone()
            err = rel(out, ref)
            ms = ms_of(lambda: run(cfg))
            rows.append({"name": f"tune {label} cfg={cfg}", "ms": ms, "metric": metric(ms),
                         "err_vs_default": err})
        except Exception as exc:
            rows.append({"name": f"tune {label} cfg={cfg}", "error": f"{type(exc).__name__}: "
                                                                   f"{str(exc)[:200]}"})
    return rows


def _paged(seqs: tuple[tuple[int, int], ...], mode: ForwardMode, hq: int = 32, hk: int = 8,
           d: int = 128, page: int = 16) -> tuple[Any, ...]:
    batch = build_batch(seqs, page, mode, DEV, torch.Generator().manual_seed(0), spare_pages=0)
    shape = (batch.num_pages, page, hk, d)
    kc = torch.randn(shape, device=DEV, dtype=BF)
    vc = torch.randn(shape, device=DEV, dtype=BF)
    q = torch.randn(batch.meta.num_tokens, hq, d, device=DEV, dtype=BF)
    return q, kc, vc, AttentionLayer(0, d ** -0.5), batch.meta


def tune_extend() -> list[Row]:
    from heteroserve.platforms.triton.attention_extend import extend_attention

    configs = [None, (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
               (128, 32, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3)]
    rows: list[Row] = []
    for seqs, label in ((((0, 4096),), "extend 1x4096"), (((0, 1024),) * 8, "extend 8x1024"),
                        (((3072, 1024),), "extend chunk1024+3072")):
        q, kc, vc, layer, meta = _paged(seqs, ForwardMode.EXTEND)
        flops = 4 * sum(n * p + n * (n + 1) / 2 for p, n in seqs) * 32 * 128
        max_ext = max(n for _, n in seqs)
        rows += _sweep(label, configs, lambda c: extend_attention(
            q, kc, vc, torch.empty_like(q), layer, meta, max_ext, 8, config=c),
            lambda ms: tflops(flops, ms))
    return rows


def tune_decode() -> list[Row]:
    from heteroserve.platforms.triton.attention_decode import decode_attention

    rows: list[Row] = []
    for b, ctx, splits in ((1, 32768, (32, 16, 64, 128)), (32, 8192, (3, 1, 2, 4, 8)),
                           (128, 2048, (1, 2)), (8, 4096, (9, 4, 16, 32))):
        q, kc, vc, layer, meta = _paged(((ctx - 1, 1),) * b, ForwardMode.DECODE)
        kv = 2 * b * ctx * 8 * 128 * 2
        configs = [(s, 64) for s in splits] + [(splits[0], 32), (splits[0], 128)]
        rows += _sweep(f"decode B{b} ctx{ctx} (splits, BLOCK_N)", configs,
                       lambda c: decode_attention(q, kc, vc, torch.empty_like(q), layer, meta,
                                                  8, c[0], block_n=c[1]),
                       lambda ms: gbps(kv, ms))
    return rows


def tune_moe() -> list[Row]:
    from heteroserve.platforms.triton.moe import fused_moe, topk_softmax

    e, k, h, inter = 8, 2, 4096, 14336
    w13 = torch.randn(e, 2 * inter, h, device=DEV, dtype=BF) * 0.02
    w2 = torch.randn(e, h, inter, device=DEV, dtype=BF) * 0.02
    small = [None, ((16, 32, 128, 4, 4),) * 2, ((16, 64, 128, 4, 4), (16, 32, 256, 4, 3)),
             ((16, 128, 128, 4, 3), (16, 64, 128, 4, 3)), ((16, 32, 64, 2, 4),) * 2,
             ((16, 64, 256, 4, 3), (16, 64, 256, 4, 3))]
    large = [None, ((64, 64, 64, 4, 3), (64, 128, 64, 4, 3)),
             ((128, 64, 64, 8, 3), (128, 128, 64, 8, 3)),
             ((64, 128, 64, 4, 4), (64, 256, 64, 8, 3)), ((128, 128, 64, 8, 3),) * 2,
             ((128, 64, 64, 4, 4), (128, 128, 64, 8, 4))]
    rows: list[Row] = []
    for t, configs in ((1, small), (32, small), (512, large), (4096, large)):
        x = torch.randn(t, h, device=DEV, dtype=BF)
        tw, tid = topk_softmax(torch.randn(t, e, device=DEV), k, True)
        flops = 2 * t * k * 3 * inter * h
        rows += _sweep(f"fused_moe T{t} E8 k2 H4096 I14336", configs,
                       lambda c: fused_moe(x, w13, w2, tw, tid, configs=c),
                       lambda ms: tflops(flops, ms))
    return rows


def tune_gemms() -> list[Row]:
    from heteroserve.platforms.triton import linear_w4a16 as w4
    from heteroserve.platforms.triton import linear_w8a8 as w8
    from heteroserve.platforms.triton.quant import quantize_rows
    from heteroserve.platforms.triton.scaled_gemm import scaled_gemm
    from heteroserve.platforms.triton.w4a16_gemm import w4a16_gemm

    k, n = 4096, 14336
    rows: list[Row] = []
    awq = _linear_layer(w4.AwqW4A16Linear(), k, n, "awq_w4a16")
    for m, configs in ((1, [None, (16, 64, 128, 4, 4, 1), (16, 64, 128, 4, 4, 4),
                            (16, 64, 128, 4, 4, 16), (16, 128, 128, 4, 4, 8),
                            (16, 32, 128, 4, 4, 8)]),
                       (4096, [None, (64, 128, 64, 4, 4, 1), (128, 256, 64, 8, 3, 1),
                               (128, 128, 128, 8, 3, 1), (64, 64, 128, 4, 4, 1)])):
        x = torch.randn(m, k, device=DEV, dtype=BF)
        rows += _sweep(f"w4a16 M{m} K{k} N{n}", configs, lambda c: w4a16_gemm(
            x, awq.w4_qweight, awq.w4_zeros, awq.w4_scales, 128, None, config=c),
            lambda ms: tflops(2 * m * n * k, ms))
    blk = _linear_layer(w8.Fp8BlockLinear(), k, n, "fp8_block")
    i8 = _linear_layer(w8.Int8W8A8Linear(), k, n, "int8_w8a8")
    for m, configs in ((1, [None, (16, 32, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 3)]),
                       (4096, [None, (128, 128, 128, 4, 4), (64, 128, 128, 4, 4),
                               (128, 256, 128, 8, 3), (256, 128, 128, 8, 3)])):
        x = torch.randn(m, k, device=DEV, dtype=BF)
        q, s = quantize_rows(x, torch.float8_e4m3fn, 448.0, 128)
        ws = blk.weight_scale_inv
        rows += _sweep(f"fp8_block gemm M{m}", configs, lambda c: scaled_gemm(
            q, blk.weight, s, (s.stride(0), 1), ws, (ws.stride(0), 1), 128, 128, BF,
            per_k_scales=True, config=c), lambda ms: tflops(2 * m * n * k, ms))
        qi, si = quantize_rows(x, torch.int8, 127.0, None)
        rows += _sweep(f"int8 gemm M{m}", configs, lambda c: scaled_gemm(
            qi, i8.weight, si, (si.stride(0), 0), i8.weight_scale, (1, 0), 1, k, BF, config=c),
            lambda ms: tflops(2 * m * n * k, ms))
    return rows


def tune_sampling() -> list[Row]:
    """Where sampling time goes: the sort, the thresholds, the draw."""
    from heteroserve.platforms.triton import sampling

    rows: list[Row] = []
    v = 152064
    for b in (1, 64, 256):
        logits = torch.randn(b, v, device=DEV)
        p = SamplingBatch(torch.full((b,), 0.7, device=DEV),
                          torch.full((b,), 50, device=DEV, dtype=torch.int32),
                          torch.full((b,), 0.9, device=DEV), torch.zeros(b, device=DEV),
                          torch.arange(b, device=DEV), torch.zeros(b, device=DEV, dtype=torch.long))
        greedy = p.temperatures <= 0
        for name, fn in (("torch.sort only", lambda: torch.sort(logits, dim=-1, descending=True)),
                         ("thresholds (sort+softmax+cumsum)",
                          lambda: sampling._thresholds(logits, p, greedy)),
                         ("full sample", lambda: sampling.sample(logits, p))):
            rows.append({"name": f"sampling breakdown B{b}: {name}", "ms": ms_of(fn),
                         "metric": ""})
    return rows


TUNE = [("tune_moe", tune_moe), ("tune_extend", tune_extend), ("tune_gemms", tune_gemms),
        ("tune_decode", tune_decode), ("tune_sampling", tune_sampling)]
