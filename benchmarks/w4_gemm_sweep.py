"""4-bit-weight linears (AWQ layout) at batch and prefill sizes on the GPU: the Triton GEMM that
dequantizes in registers (:func:`~heteroserve.platforms.triton.w4a16_gemm.w4a16_gemm`) against
dequantizing the weight in one pass and calling the BLAS GEMM
(:func:`~heteroserve.platforms.triton.w4a16_dequant.w4a16_dequantize` + ``torch.mm``), with
bf16 cuBLAS (``F.linear``) on the dense weight timed beside them, at Llama-3.1-8B's projection
shapes and ``M`` rows.

Both 4-bit paths go through the real ``AwqW4A16Linear.apply``; the path is chosen by
``W4_DEQUANT_MIN_ROWS`` of ``platforms/triton/linear_w4a16.py`` (set to 0 or to infinity
here). Each call is timed by replaying a CUDA graph over enough weight copies that they do
not fit in L2 (``quant_gemv_sweep.graph_us``). The dequantized path's output is compared with
the Triton GEMM's. Writes JSON and a PNG (speed-up over bf16 per M): the data behind
``W4_DEQUANT_MIN_ROWS``.

Usage: ``python benchmarks/w4_gemm_sweep.py --out w4_gemm.json`` (about a minute on an H100).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_sweep_common import layer_copies, sweep_main  # noqa: E402
from quant_gemv_sweep import SHAPES, graph_us, rel_err  # noqa: E402

ROWS = (16, 32, 64, 128, 256, 512, 1024, 2048, 8192)
PATHS = ("triton_gemm", "dequant_blas")


@contextmanager
def dequant_from(rows: int) -> Iterator[None]:
    """Send batches of ``rows`` rows and more through the dequantized weight (no GEMV)."""
    from heteroserve.platforms.triton import linear_w4a16 as w4

    saved = w4.W4_DEQUANT_MIN_ROWS, w4.W4_GEMV_MAX_ROWS
    w4.W4_DEQUANT_MIN_ROWS, w4.W4_GEMV_MAX_ROWS = rows, 0
    try:
        yield
    finally:
        w4.W4_DEQUANT_MIN_ROWS, w4.W4_GEMV_MAX_ROWS = saved


def measure(device: torch.device, rows_list: tuple[int, ...]) -> list[dict]:
    results = []
    for name, n, k in SHAPES:
        gen = torch.Generator(device).manual_seed(n + k)
        _, bf16_layers = layer_copies("unquantized", n, k, device, gen)
        method, w4_layers = layer_copies("awq_w4a16", n, k, device, gen)
        for m in rows_list:
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            row: dict = {"shape": name, "N": n, "K": k, "M": m,
                         "bf16_us": graph_us(lambda layer, x: F.linear(x, layer.weight),
                                             bf16_layers, x, min_calls=50)}
            outs = {}
            for path, threshold in zip(PATHS, (10**12, 0)):
                with dequant_from(threshold):
                    outs[path] = method.apply(w4_layers[0], x)
                    row[f"{path}_us"] = graph_us(lambda layer, x: method.apply(layer, x),
                                                 w4_layers, x, min_calls=50)
            row["dequant_blas_err_vs_triton_gemm"] = rel_err(outs["dequant_blas"],
                                                             outs["triton_gemm"])
            results.append(row)
            print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}"
                           for k_, v in row.items()), flush=True)
    return results


def main() -> None:
    sweep_main(__doc__, "w4_gemm.json", ROWS, measure, {p: f"{p}_us" for p in PATHS})


if __name__ == "__main__":
    main()
