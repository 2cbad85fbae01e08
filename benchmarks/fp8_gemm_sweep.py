"""fp8 GEMMs at prefill and large-batch decode sizes on the GPU: each fp8 scheme's Triton GEMM
(:func:`~heteroserve.platforms.triton.scaled_gemm.scaled_gemm`) against cuBLASLt's scaled fp8
GEMM (``torch._scaled_mm``: 1x128 / 128x128 block scales for ``fp8_block``, row scales for
``fp8_per_channel``, one scale for ``fp8_per_tensor``), with bf16 cuBLAS (``F.linear``) timed
beside them, at Llama-3.1-8B's projection shapes and ``M`` rows.

Both fp8 paths go through the real linear method's ``apply`` (activation quantization
included); the path is chosen by ``CUBLAS_FP8_MIN_ROWS`` of
``platforms/triton/linear_w8a8.py`` (set to 0 or to infinity here). Each call is timed by replaying a CUDA graph, over enough
weight copies that they do not fit in L2. The cuBLAS path's output is compared with the
Triton path's. Writes JSON (and a PNG of speed-up over bf16 per M): the data behind
``CUBLAS_FP8_MIN_ROWS``.

Usage: ``python benchmarks/fp8_gemm_sweep.py --out fp8_gemm.json`` (about a minute on an H200).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_sweep_common import layer_copies, sweep_main  # noqa: E402
from quant_gemv_sweep import SHAPES, graph_us, rel_err  # noqa: E402

SCHEMES = ("fp8_block", "fp8_per_channel", "fp8_per_tensor")
ROWS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@contextmanager
def cublas_variant(fast: bool = False, swap: bool = False) -> Iterator[None]:
    """cuBLASLt calls with fast accumulation (the schemes that accept it) and/or the block
    product weight-first at every width, for the duration."""
    from heteroserve.platforms.triton import cublas_fp8

    saved = set(cublas_fp8.FAST_ACCUM), cublas_fp8.BLOCK_SWAP_MAX_N
    if fast:
        cublas_fp8.FAST_ACCUM.update(cublas_fp8.FAST_ACCUM_SCHEMES)
    if swap:
        cublas_fp8.BLOCK_SWAP_MAX_N = 1 << 30
    try:
        yield
    finally:
        cublas_fp8.FAST_ACCUM.clear()
        cublas_fp8.FAST_ACCUM.update(saved[0])
        cublas_fp8.BLOCK_SWAP_MAX_N = saved[1]


#: the cuBLASLt variants timed beside the default call: suffix -> (fast, swap, schemes)
VARIANTS = {"_fast": (True, False, ("fp8_per_channel", "fp8_per_tensor")),
            "_swapped": (False, True, ("fp8_block",))}


@contextmanager
def thresholds(rows: int) -> Iterator[None]:
    """Send every batch above ``rows`` rows (and no GEMV-sized one) to cuBLASLt."""
    from heteroserve.platforms.triton import linear_w8a8 as w8

    saved = dict(w8.CUBLAS_FP8_MIN_ROWS), w8.W8_GEMV_MAX_ROWS
    w8.CUBLAS_FP8_MIN_ROWS.update({s: rows for s in SCHEMES})
    w8.W8_GEMV_MAX_ROWS = 0
    try:
        yield
    finally:
        w8.CUBLAS_FP8_MIN_ROWS.update(saved[0])
        w8.W8_GEMV_MAX_ROWS = saved[1]


def measure(device: torch.device, rows_list: tuple[int, ...]) -> list[dict]:
    from heteroserve.platforms.triton.linear_w8a8 import scaled_mm_supports

    support = {s: scaled_mm_supports(s, device)
               for s in ("fp8_block", "fp8_block_swapped", "fp8_per_channel")}
    print(f"cuBLASLt scaled fp8 probe: {support}", flush=True)
    results = []
    for name, n, k in SHAPES:
        gen = torch.Generator(device).manual_seed(n + k)
        _, bf16_layers = layer_copies("unquantized", n, k, device, gen)
        bf16: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = \
            lambda layer, x: F.linear(x, layer.weight)  # noqa: E731
        built = {s: layer_copies(s, n, k, device, gen) for s in SCHEMES}
        for m in rows_list:
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            t_bf16 = graph_us(bf16, bf16_layers, x, min_calls=50)
            row = {"shape": name, "N": n, "K": k, "M": m, "bf16_us": t_bf16}
            for scheme, (method, layers) in built.items():
                call = lambda layer, x, method=method: method.apply(layer, x)  # noqa: E731
                with thresholds(10**12):
                    y_triton = call(layers[0], x)
                    row[f"{scheme}_triton_us"] = graph_us(call, layers, x, min_calls=50)
                with thresholds(0):
                    y_cublas = call(layers[0], x)
                    row[f"{scheme}_cublas_us"] = graph_us(call, layers, x, min_calls=50)
                row[f"{scheme}_cublas_err_vs_triton"] = rel_err(y_cublas, y_triton)
                for suffix, (fast, swap, schemes) in VARIANTS.items():
                    if scheme not in schemes or (swap and not support["fp8_block_swapped"]):
                        continue
                    with thresholds(0), cublas_variant(fast, swap):
                        y_var = call(layers[0], x)
                        row[f"{scheme}_cublas{suffix}_us"] = graph_us(call, layers, x,
                                                                      min_calls=50)
                    row[f"{scheme}_cublas{suffix}_err_vs_triton"] = rel_err(y_var, y_triton)
            results.append(row)
            print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}"
                           for k_, v in row.items()), flush=True)
    return results


def main() -> None:
    series = {f"{s} {g}": f"{s}_{g}_us" for s in SCHEMES for g in ("triton", "cublas")}
    series.update({f"{s} cublas{suffix}": f"{s}_cublas{suffix}_us"
                   for suffix, (_, _, schemes) in VARIANTS.items() for s in schemes})
    sweep_main(__doc__, "fp8_gemm.json", ROWS, measure, series)


if __name__ == "__main__":
    main()
