"""flashinfer's sm90 block-scale GEMM (DeepGEMM kernels, ``platforms/cuda/flashinfer_fp8_block.py``)
next to cuBLASLt's block-scaled fp8 GEMM and bf16 cuBLAS, at Llama-3.1-8B's projections.

Why: fp8-block offline throughput stays at 1.17x bf16 (issue 16 asks 1.3x) because cuBLASLt's
block-scaled GEMM runs 0.85-1.49x bf16 by layer at prefill sizes
(``results/h100-20261207-0939-fp8_block_tiles.json``). This asks, per layer and row count,
whether flashinfer's kernel is the faster block path, from how many rows, what its first
call per tile costs (NVRTC compiles each DeepGEMM tile once), and how close each path is to
the float64 product of the per-group quantized activations and the dequantized weight.

Every timing goes through a real linear method's ``apply`` (activation quantization included)
over enough weight copies to overflow the L2, eagerly (prefill steps run eagerly in the
engine), timed by CUDA events over at least 20 calls after a warm-up pass; row counts up to :data:`GRAPH_MAX_ROWS` (decode batches, which the engine replays
from CUDA graphs and which eagerly are bound by the host's launch work) also from replays of
one captured graph per path. Writes ``{"device", "date", "torch", "command", "results",
"seconds"}`` and a PNG of each path's speed-up over bf16.

Usage (GPU): ``python benchmarks/fp8_block_deepgemm.py --out fp8_block_deepgemm.json
[--rows 256,1024,8192]``; ``--plot JSON`` redraws the PNG of an earlier run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemm_sweep_common import layer_copies, sweep_main  # noqa: E402
from quant_gemv_sweep import SHAPES, graph_us, rel_err  # noqa: E402

from heteroserve.conformance.oracles.linear import dequantize, quantize_activations  # noqa: E402

ROWS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
#: row counts also timed from CUDA-graph replays (decode batches; eagerly they are host-bound)
GRAPH_MAX_ROWS = 512
SERIES = {"fp8 block, cuBLASLt": "cublas_block_us", "fp8 block, flashinfer (DeepGEMM)":
          "flashinfer_us"}
Call = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def eager_us(call: Call, layers: list[torch.nn.Module], x: torch.Tensor,
             min_calls: int = 20) -> float:
    """Microseconds per call of ``call`` cycling through ``layers``, eagerly, after one
    warm-up pass."""
    for layer in layers:
        call(layer, x)
    torch.cuda.synchronize()
    rounds = max(1, -(-min_calls // len(layers)))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        for layer in layers:
            call(layer, x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (rounds * len(layers))


def oracle(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """float64 ``q(x) @ W^T`` on ``x``'s device: the conformance suite's per-row, 128-column
    e4m3 activation quantization and dequantized fp8-block weight (computed on the CPU), their
    product on the GPU."""
    w = dequantize("fp8_block", {"weight": layer.weight.data,
                                 "weight_scale_inv": layer.weight_scale_inv.data}, 128)
    q = quantize_activations("fp8_block", x, torch.float8_e4m3fn)
    return q.to(x.device) @ w.to(x.device).t()


def measure(device: torch.device, rows: tuple[int, ...]) -> list[dict]:
    """One row per (shape, M): bf16, cuBLASLt block and flashinfer microseconds, flashinfer's
    first-call seconds, and both fp8 paths' errors against :func:`oracle`."""
    from heteroserve.platforms.cuda import flashinfer_fp8_block as fi

    fi.MIN_ROWS = 1  # every row count of the sweep through flashinfer
    why = fi.unavailable(device)
    if why:
        sys.exit(f"flashinfer's block-scale GEMM is unavailable: {why}")
    flashinfer = fi.FlashInferFp8BlockLinear()
    results = []
    for name, n, k in SHAPES:
        gen = torch.Generator(device).manual_seed(n + k)
        _, bf16_layers = layer_copies("unquantized", n, k, device, gen)
        method, layers = layer_copies("fp8_block", n, k, device, gen)
        for m in rows:
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m}
            row["bf16_us"] = eager_us(lambda layer, x: F.linear(x, layer.weight), bf16_layers, x)
            row["cublas_block_us"] = eager_us(method.apply, layers, x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y_fi = flashinfer.apply(layers[0], x)
            torch.cuda.synchronize()
            row["flashinfer_first_call_s"] = time.perf_counter() - t0
            row["flashinfer_us"] = eager_us(flashinfer.apply, layers, x)
            ref = oracle(x, layers[0])
            row["cublas_block_err"] = rel_err(method.apply(layers[0], x), ref)
            row["flashinfer_err"] = rel_err(y_fi, ref)
            del ref, y_fi
            if m <= GRAPH_MAX_ROWS:
                row["bf16_graph_us"] = graph_us(lambda layer, x: F.linear(x, layer.weight),
                                                bf16_layers, x, min_calls=40)
                row["cublas_block_graph_us"] = graph_us(method.apply, layers, x, min_calls=40)
                row["flashinfer_graph_us"] = graph_us(flashinfer.apply, layers, x, min_calls=40)
                print(f"{name} M={m} from graphs: bf16 {row['bf16_graph_us']:.1f} us, cuBLASLt "
                      f"block {row['cublas_block_graph_us']:.1f}, flashinfer "
                      f"{row['flashinfer_graph_us']:.1f}", flush=True)
            print(f"{name} M={m}: bf16 {row['bf16_us']:.1f} us, cuBLASLt block "
                  f"{row['cublas_block_us']:.1f} ({row['bf16_us'] / row['cublas_block_us']:.2f}x"
                  f", err {row['cublas_block_err']:.1e}), flashinfer {row['flashinfer_us']:.1f} "
                  f"({row['bf16_us'] / row['flashinfer_us']:.2f}x, err "
                  f"{row['flashinfer_err']:.1e}, first call {row['flashinfer_first_call_s']:.2f}"
                  " s)", flush=True)
            results.append(row)
        del bf16_layers, layers
        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    sweep_main(__doc__, "fp8_block_deepgemm.json", ROWS, measure, SERIES)
