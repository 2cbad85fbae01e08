"""Batch-1 quantized linear layers of Llama-3.1-8B on the GPU: each scheme's decode path
before the GEMVs (the GEMM-shaped kernels, with a separate activation-quantization launch for
W8A8) against the GEMV path now in ``apply``, through the real linear methods.

Weights are random tensors in each scheme's checkpoint layout, loaded through the method's
``process_weights_after_loading``; enough copies rotate that the set is larger than the L2,
so every call streams from device memory. Each path is captured in one CUDA graph (which
also checks that it is graph-capturable) and timed by replay; bandwidth counts the weight
bytes a call reads (weights, scales, zero points), next to the copy bandwidth measured in
the same run. The old path is the same ``apply`` with the GEMV row threshold set to 0. The
new path's output is compared with the old one's (relative max error). Writes JSON.
``--sweep`` also times each GEMV over a grid of launch shapes (minutes; for tuning
``choose_w8_config`` / ``choose_w4_config``).
In ``--smoke`` runs the old path's errors are the interpreter's (its bf16 ``tl.dot`` and
fp8 cast are wrong), not the kernels'; the new path is checked against float64 there.
Usage: ``python benchmarks/quant_gemv_sweep.py --out quant_gemv.json`` (about a minute on
an H200); ``--smoke`` runs tiny shapes on the CPU under the Triton interpreter and checks the
new path against the float64 oracle of conformance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: (name, N, K) of Llama-3.1-8B's projections at tensor-parallel size 1
SHAPES = [("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 28672, 4096),
          ("down_proj", 4096, 14336)]
SMOKE_SHAPES = [("ragged_n", 200, 384)]
SCHEMES = ("unquantized", "fp8_block", "fp8_per_channel", "fp8_per_tensor", "int8_w8a8",
           "awq_w4a16", "gptq_w4a16")
METHODS = {"unquantized": ("linear_float", "UnquantizedLinear"),
           "fp8_block": ("linear_w8a8", "Fp8BlockLinear"),
           "fp8_per_channel": ("linear_w8a8", "Fp8PerChannelLinear"),
           "fp8_per_tensor": ("linear_w8a8", "Fp8PerTensorLinear"),
           "int8_w8a8": ("linear_w8a8", "Int8W8A8Linear"),
           "awq_w4a16": ("linear_w4a16", "AwqW4A16Linear"),
           "gptq_w4a16": ("linear_w4a16", "GptqW4A16Linear")}
GROUP = 128
L2_MULTIPLE = 4 * 60 * 2**20
FP8 = torch.float8_e4m3fn


def checkpoint(scheme: str, n: int, k: int, device: torch.device,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors in ``scheme``'s checkpoint layout (``core/kernels/linear.py``), with
    weights of a realistic magnitude (outputs near unit scale for unit activations)."""
    from heteroserve.core.kernels.linear import FP8_BLOCK

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    def rand_words(*shape: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64,
                             device=device).to(torch.int32)

    s = 1.0 / math.sqrt(k)
    if scheme == "unquantized":
        return {"weight": (randn(n, k) * s).to(torch.bfloat16)}
    if scheme.startswith("fp8"):
        w = (randn(n, k) * 100).clamp(-448, 448).to(FP8)
        scale = {"fp8_block": lambda: torch.full((-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)),
                                                 s / 100, device=device),
                 "fp8_per_channel": lambda: torch.full((n, 1), s / 100, device=device),
                 "fp8_per_tensor": lambda: torch.full((1,), s / 100, device=device)}[scheme]()
        name = "weight_scale_inv" if scheme == "fp8_block" else "weight_scale"
        return {"weight": w, name: scale}
    if scheme == "int8_w8a8":
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8, device=device)
        return {"weight": w, "weight_scale": torch.full((n, 1), s / 64, device=device)}
    scales = (torch.rand(k // GROUP, n, generator=gen, device=device) * s / 4).to(torch.float16)
    if scheme == "awq_w4a16":
        return {"qweight": rand_words(k, n // 8), "qzeros": rand_words(k // GROUP, n // 8),
                "scales": scales}
    return {"qweight": rand_words(k // 8, n), "qzeros": rand_words(k // GROUP, n // 8),
            "scales": scales}


def build_layer(scheme: str, n: int, k: int, ckpt: dict[str, torch.Tensor]
                ) -> tuple[object, torch.nn.Module]:
    """``(method, layer)`` loaded from ``ckpt`` the way the model loader does it."""
    import importlib

    from heteroserve.core.kernels.linear import LinearShape

    module, attr = METHODS[scheme]
    method = getattr(importlib.import_module(f"heteroserve.platforms.triton.{module}"), attr)()
    layer = torch.nn.Module()
    for name in method.create_weights(LinearShape(k, n, torch.bfloat16, GROUP)):
        layer.register_parameter(name, torch.nn.Parameter(ckpt[name].clone(),
                                                          requires_grad=False))
    method.process_weights_after_loading(layer)
    return method, layer


def weight_bytes(layer: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


@contextmanager
def old_path() -> Iterator[None]:
    """The decode path before the GEMVs: every row count goes to the GEMM."""
    from heteroserve.platforms.triton import linear_w4a16, linear_w8a8

    saved = linear_w8a8.W8_GEMV_MAX_ROWS, linear_w4a16.W4_GEMV_MAX_ROWS
    linear_w8a8.W8_GEMV_MAX_ROWS = linear_w4a16.W4_GEMV_MAX_ROWS = 0
    try:
        yield
    finally:
        linear_w8a8.W8_GEMV_MAX_ROWS, linear_w4a16.W4_GEMV_MAX_ROWS = saved


def call_for(scheme: str, method: object, path: str
             ) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    if scheme == "unquantized" and path == "old":
        return lambda layer, x: F.linear(x, layer.weight)  # cuBLAS
    return lambda layer, x: method.apply(layer, x)  # type: ignore[attr-defined]


def graph_us(call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
             layers: list[torch.nn.Module], x: torch.Tensor, min_calls: int = 400) -> float:
    """Microseconds per call, from replays of one CUDA graph that cycles through ``layers``."""
    for layer in layers:  # compile and warm up outside the capture
        call(layer, x)
    torch.cuda.synchronize()
    rounds = max(1, -(-min_calls // len(layers)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for layer in layers:
                call(layer, x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * rounds * len(layers))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double().cpu()
    return float((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


@contextmanager
def _new_path() -> Iterator[None]:
    yield


def measure_shape(name: str, n: int, k: int, schemes: tuple[str, ...], device: torch.device,
                  smoke: bool, copy_Bps: float) -> list[dict]:
    """Rows ``{shape, scheme, path, us, GBps, frac_copy, ...}`` for one layer shape; in
    ``smoke`` mode also the new path's error against the float64 oracle (asserted < 2e-2,
    the bf16 conformance bound)."""
    from heteroserve.conformance.oracles import linear as oracle

    gen = torch.Generator(device).manual_seed(n * 7 + k)  # device-side: fast for 8B shapes
    x = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)
    rows = []
    for scheme in schemes:
        ckpt = checkpoint(scheme, n, k, device, gen)
        method, first = build_layer(scheme, n, k, ckpt)
        nbytes = weight_bytes(first)
        copies = 1 if smoke else max(1, -(-L2_MULTIPLE // nbytes))
        layers = [first] + [build_layer(scheme, n, k, ckpt)[1] for _ in range(copies - 1)]
        outs: dict[str, torch.Tensor] = {}
        for path in ("old", "new"):
            call = call_for(scheme, method, path)
            with old_path() if path == "old" else _new_path():
                if smoke:
                    t0 = time.perf_counter()
                    outs[path] = call(first, x)
                    t = (time.perf_counter() - t0) * 1e6
                else:
                    outs[path] = call(first, x)
                    t = graph_us(call, layers, x)
            bps = nbytes / (t * 1e-6)
            row = {"shape": name, "N": n, "K": k, "scheme": scheme, "path": path, "us": t,
                   "weight_bytes": nbytes, "GBps": bps / 1e9, "frac_copy": bps / copy_Bps}
            note = ""
            if path == "new":
                row["rel_err_vs_old"] = rel_err(outs["new"], outs["old"])
                note = f"  err vs old {row['rel_err_vs_old']:.1e}"
                if smoke:
                    ref = oracle.linear(scheme, x.double().cpu(),
                                        {key: v.cpu() for key, v in ckpt.items()}, GROUP, None,
                                        FP8)
                    row["rel_err_vs_oracle"] = rel_err(outs["new"], ref)
                    note += f"  vs float64 {row['rel_err_vs_oracle']:.1e}"
                    assert row["rel_err_vs_oracle"] < 2e-2, row
            rows.append(row)
            print(f"{name:13s} {scheme:16s} {path}: {t:9.1f} us {bps / 1e9:8.1f} GB/s "
                  f"{bps / copy_Bps:6.1%} of copy{note}", flush=True)
        del ckpt, layers, first
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


#: scheme -> (activation granularity, weight-scale layout, scale parameter) of ``w8_gemv``
_W8_ARGS = {"fp8_block": ("ACT_GROUP", "WS_BLOCK", "weight_scale_inv"),
            "fp8_per_channel": ("ACT_ROW", "WS_CHANNEL", "weight_scale"),
            "fp8_per_tensor": ("ACT_TENSOR", "WS_TENSOR", "weight_scale"),
            "int8_w8a8": ("ACT_ROW", "WS_CHANNEL", "weight_scale")}


def config_calls(scheme: str, layer: torch.nn.Module
                 ) -> list[tuple[dict, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]]:
    """``(config, call)`` for each launch shape of the scheme's GEMV (``--sweep``)."""
    from heteroserve.platforms.triton import w4a16_gemv as w4
    from heteroserve.platforms.triton import w8_gemv as w8

    out = []
    if scheme in _W8_ARGS:
        act, ws, scale = (getattr(w8, _W8_ARGS[scheme][0]), getattr(w8, _W8_ARGS[scheme][1]),
                          _W8_ARGS[scheme][2])
        for bn in (4, 8, 16, 32):
            for bk in (512, 1024, 2048):
                for warps in (4, 8):
                    cfg = w8.W8GemvConfig(bn, bk, warps, 1)
                    out.append((cfg.__dict__, lambda lay, x, cfg=cfg: w8.w8_gemv(
                        x, lay.weight, getattr(lay, scale), act, ws,
                        float(torch.finfo(lay.weight.dtype).max)
                        if lay.weight.dtype.is_floating_point else 127.0, x.dtype,
                        config=cfg)))
    elif scheme.endswith("w4a16"):
        # every launch shape with the default (subnormal) nibble decoding, and the default
        # shape with the previous (exponent) decoding: the A/B of the decoding
        k, n = layer.w4_in_features, layer.w4_qweight.shape[1]
        default = w4.choose_w4_config(n, k, 1, layer.w4_qweight.device)
        # tiles of 2, 4 and 8 KiB a warp (a thread: 8 columns of 2, 4 or 8 word rows)
        cfgs = [w4.W4GemvConfig(bn, words // bn, warps, 1) for bn in (8, 16, 32, 64)
                for warps in (2, 4, 8) for words in (512 * warps, 1024 * warps, 2048 * warps)
                if words // bn <= 1024]
        # the next tile's loads issued before a tile's products (8 columns of 4 or 2 word
        # rows a thread)
        cfgs += [w4.W4GemvConfig(bn, words // bn, warps, 1, prefetch=True)
                 for bn in (8, 16, 32) for warps in (1, 2, 4)
                 for words in (512 * warps, 1024 * warps)]
        cfgs.append(dataclasses.replace(default, nibble=w4.NIBBLE_EXPONENT))
        for cfg in cfgs:
            out.append((cfg.__dict__, lambda lay, x, cfg=cfg: w4.w4a16_gemv(
                x, lay.w4_qweight, lay.w4_zeros, lay.w4_scales,
                lay.w4_in_features // lay.w4_zeros.shape[0], config=cfg)))
    return out


def sweep_shape(name: str, n: int, k: int, schemes: tuple[str, ...], copy_bps: float
                ) -> list[dict]:
    """The GEMV of each scheme over a grid of launch shapes; rows with ``config``, the best
    last per scheme (a config the compiler rejects is a row with its error)."""
    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(n * 7 + k)  # device-side: fast for 8B shapes
    x = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)
    rows: list[dict] = []
    for scheme in schemes:
        ckpt = checkpoint(scheme, n, k, device, gen)
        method, first = build_layer(scheme, n, k, ckpt)
        nbytes = weight_bytes(first)
        layers = [first] + [build_layer(scheme, n, k, ckpt)[1]
                            for _ in range(max(1, -(-L2_MULTIPLE // nbytes)) - 1)]
        ref = method.apply(first, x).double()
        best = None
        for cfg, call in config_calls(scheme, first):
            try:
                err = rel_err(call(first, x), ref)
                t = graph_us(call, layers, x, min_calls=200)
            except Exception as e:  # noqa: BLE001 - a rejected config is a row
                rows.append({"shape": name, "scheme": scheme, "config": cfg,
                             "error": str(e)[:200]})
                continue
            row = {"shape": name, "N": n, "K": k, "scheme": scheme, "path": "sweep",
                   "config": cfg, "us": t, "GBps": nbytes / t / 1e3,
                   "frac_copy": nbytes / (t * 1e-6) / copy_bps, "rel_err_vs_default": err}
            rows.append(row)
            if cfg.get("nibble") == "exponent":
                print(f"{name:13s} {scheme:16s} exponent decoding {t:8.1f} us "
                      f"{row['frac_copy']:6.1%} of copy {cfg}", flush=True)
            if err < 1e-2 and (best is None or t < best["us"]):
                best = row
        if best is not None:
            print(f"{name:13s} {scheme:16s} best {best['us']:8.1f} us "
                  f"{best['frac_copy']:6.1%} of copy {best['config']}", flush=True)
            rows.append({**best, "path": "sweep_best"})
        del ckpt, layers, first
        torch.cuda.empty_cache()
    return rows


def _cpu_copy_bandwidth(num_bytes: int = 64 << 20) -> float:
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    return 2 * num_bytes / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="quant_gemv.json")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--sweep", action="store_true",
                    help="also time each GEMV over a grid of launch shapes (GPU, minutes)")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help="comma-separated subset of " + ", ".join(SCHEMES))
    a = ap.parse_args(argv)
    schemes = tuple(s for s in a.schemes.split(",") if s)
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown scheme(s) {', '.join(unknown)}")
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        device, shapes, copy_Bps = torch.device("cpu"), SMOKE_SHAPES, _cpu_copy_bandwidth()
        device_name = "cpu (Triton interpreter)"
    else:
        from roofline import copy_bandwidth

        device, shapes, copy_Bps = torch.device("cuda"), SHAPES, copy_bandwidth()
        device_name = torch.cuda.get_device_name()
    print(f"device {device_name}, copy bandwidth {copy_Bps / 1e12:.2f} TB/s", flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name, n, k in shapes:
        rows += measure_shape(name, n, k, schemes, device, a.smoke, copy_Bps)
        if a.sweep and not a.smoke:
            rows += sweep_shape(name, n, k, tuple(s for s in schemes if s != "unquantized"),
                                copy_Bps)
    Path(a.out).write_text(json.dumps({
        "device": device_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv), "copy_bandwidth_Bps": copy_Bps,
        "seconds": time.perf_counter() - t0, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
