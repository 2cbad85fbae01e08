"""Tile shapes of the Triton fp8-block GEMM (:func:`~heteroserve.platforms.triton.scaled_gemm.
scaled_gemm` with 128x128 weight blocks and 1x128 activation groups) at Llama-3.1-8B's
projection shapes and large ``M``, next to cuBLASLt's block-scaled fp8 GEMM and bf16 cuBLAS in
the same process.

Why: on an H200 (``results/fp8_gemm_h200.json``) the block-scaled cuBLASLt GEMM ran no faster
than bf16 at prefill sizes (down_proj at 8192 rows: 1367 against 1377 us; per-tensor fp8 932),
which holds fp8-block offline throughput at 1.17x bf16 against issue 16's 1.3x, and the Triton
GEMM at its one large-M tile (64 x 128 x 128, 4 warps, 4 stages) ran 2171 us. This sweep asks
whether another tile makes the Triton GEMM the faster block path.

Every timing goes through the real ``Fp8BlockLinear.apply`` (activation quantization
included), replayed from a CUDA graph over enough weight copies to overflow the L2; each
candidate's output is compared with the default tile's. Prints one line per (shape, M,
candidate) and writes ``{"device", "date", "torch", "command", "results", "best",
"seconds"}`` as JSON.

Usage: ``python benchmarks/fp8_block_tiles.py --out fp8_block_tiles.json [--rows 2048,8192]``
(a PNG of each path's speed-up over bf16 is written beside the JSON; ``--plot JSON`` redraws
it from an earlier run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_gemm_sweep import thresholds  # noqa: E402
from gemm_sweep_common import layer_copies  # noqa: E402
from quant_gemv_sweep import SHAPES, graph_us, rel_err  # noqa: E402

Tile = tuple[int, int, int, int, int]
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K divides the 128-column groups
CANDIDATES: tuple[Tile, ...] = (
    (64, 128, 128, 4, 4),   # the rule's large-M tile
    (64, 128, 128, 4, 3), (64, 128, 128, 4, 5),
    (128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 3),
    (64, 256, 128, 4, 3), (64, 256, 128, 8, 3), (128, 256, 128, 8, 3),
    (128, 64, 128, 4, 4), (128, 128, 64, 8, 4), (64, 128, 64, 4, 5),
)
ROWS = (256, 2048, 8192)


@contextmanager
def tile(config: Tile | None) -> Iterator[None]:
    """Make ``scaled_gemm`` take ``config`` for every call (None: its own rule)."""
    from heteroserve.platforms.triton import scaled_gemm as sg

    saved = sg.gemm_config
    if config is not None:
        sg.gemm_config = lambda m, elem_bytes, per_k: config
    try:
        yield
    finally:
        sg.gemm_config = saved


def measure(device: torch.device, rows: tuple[int, ...], candidates: tuple[Tile, ...]
            ) -> list[dict]:
    """One row per (shape, M): bf16, cuBLASLt block and each candidate's microseconds."""
    results = []
    for name, n, k in SHAPES:
        gen = torch.Generator(device).manual_seed(n + k)
        _, bf16_layers = layer_copies("unquantized", n, k, device, gen)
        method, layers = layer_copies("fp8_block", n, k, device, gen)
        call = lambda layer, x: method.apply(layer, x)  # noqa: E731
        for m in rows:
            x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "M": m,
                   "bf16_us": graph_us(lambda layer, x: F.linear(x, layer.weight),
                                       bf16_layers, x, min_calls=20)}
            with thresholds(0):
                row["cublas_block_us"] = graph_us(call, layers, x, min_calls=20)
            with thresholds(10**12):
                ref = call(layers[0], x)
                row["triton"] = {}
                for cand in candidates:
                    with tile(cand):
                        try:
                            us = graph_us(call, layers, x, min_calls=20)
                            err = rel_err(call(layers[0], x), ref)
                        except Exception as exc:  # a tile Triton cannot build (shared memory)
                            print(f"{name} M={m} {cand}: {type(exc).__name__}", flush=True)
                            continue
                    row["triton"][str(list(cand))] = {"us": us, "err_vs_rule": err}
                    print(f"{name} M={m} {cand}: {us:.1f} us (bf16 {row['bf16_us']:.1f}, "
                          f"cuBLASLt block {row['cublas_block_us']:.1f}), err {err:.1e}",
                          flush=True)
            results.append(row)
    return results


def best_tiles(results: list[dict]) -> dict[str, dict]:
    """Per ``"shape M"``: the fastest candidate, its time, and the bf16 / cuBLASLt times."""
    best = {}
    for row in results:
        if not row["triton"]:
            continue
        cand, t = min(row["triton"].items(), key=lambda kv: kv[1]["us"])
        best[f"{row['shape']} {row['M']}"] = {
            "tile": json.loads(cand), "us": t["us"], "bf16_us": row["bf16_us"],
            "cublas_block_us": row["cublas_block_us"],
            "speedup_vs_bf16": row["bf16_us"] / t["us"]}
    return best


RULE_TILE = "[64, 128, 128, 4, 4]"


def plot(data: dict, path: Path) -> bool:
    """Bars per (shape, M): bf16, cuBLASLt block, the rule's Triton tile and the best Triton
    tile, each as speed-up over bf16; False (no plot) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["triton"]]
    best = data["best"]
    series = {
        "bf16 cuBLAS": [r["bf16_us"] for r in rows],
        "fp8 block cuBLASLt": [r["cublas_block_us"] for r in rows],
        "fp8 block Triton, rule tile": [r["triton"].get(RULE_TILE, {"us": float("nan")})["us"]
                                        for r in rows],
        f"fp8 block Triton, best of {len(CANDIDATES)} tiles":
            [best[f"{r['shape']} {r['M']}"]["us"] for r in rows],
    }
    fig, ax = plt.subplots(figsize=(2 * len(rows) + 2, 4))
    width = 0.8 / len(series)
    for i, (label, times) in enumerate(series.items()):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))],
               [r["bf16_us"] / t for r, t in zip(rows, times)], width, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['shape']}\n{r['M']} rows" for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up over bf16 cuBLAS")
    ax.set_title(f"{data['device']}, {data['date']} (activation quantization included)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fp8_block_tiles.json")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an earlier run")
    args = ap.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("fp8_block_tiles.py needs a CUDA device")
    t0 = time.time()
    results = measure(torch.device("cuda"), tuple(int(r) for r in args.rows.split(",")),
                      CANDIDATES)
    best = best_tiles(results)
    for key, b in best.items():
        print(f"best {key}: {b['tile']} {b['us']:.1f} us, {b['speedup_vs_bf16']:.2f}x bf16 "
              f"(cuBLASLt block {b['cublas_block_us']:.1f} us)", flush=True)
    data = {"device": torch.cuda.get_device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "command": " ".join(sys.argv), "results": results, "best": best,
            "seconds": time.time() - t0}
    Path(args.out).write_text(json.dumps(data, indent=1))
    plot(data, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
