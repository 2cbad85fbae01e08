"""What the GEMM sweeps (``fp8_gemm_sweep.py``, ``w4_gemm_sweep.py``) share: layers built in
enough copies to overflow the L2, a PNG of each path's speed-up over bf16 per row count and
shape, and the command line that measures on the GPU and writes ``{"device", "date", "torch",
"command", "results", "seconds"}`` as JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from quant_gemv_sweep import SHAPES, build_layer, checkpoint

L2_BYTES = 240 * 2**20


def layer_copies(scheme: str, n: int, k: int, device: torch.device, gen: torch.Generator
                 ) -> tuple[object, list[torch.nn.Module]]:
    """``(method, layers)``: one random ``scheme`` checkpoint of an ``[n, k]`` projection
    loaded into as many layers as it takes to exceed :data:`L2_BYTES` together, so a sweep
    cycling through them streams from device memory."""
    ckpt = checkpoint(scheme, n, k, device, gen)
    method, first = build_layer(scheme, n, k, ckpt)
    nbytes = sum(p.numel() * p.element_size() for p in first.parameters())
    copies = max(1, -(-L2_BYTES // nbytes))
    return method, [first] + [build_layer(scheme, n, k, ckpt)[1] for _ in range(copies - 1)]


def plot_speedups(results: list[dict], path: Path, series: dict[str, str]) -> bool:
    """One panel per shape: ``bf16_us / row[key]`` against ``M`` for each ``label: key`` of
    ``series`` that every row of the shape has; False (no plot) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(5 * len(SHAPES), 4), sharey=True)
    for ax, (name, _, _) in zip(axes, SHAPES):
        rows = [r for r in results if r["shape"] == name]
        ms = [r["M"] for r in rows]
        for label, key in series.items():
            if rows and all(key in r for r in rows):  # a variant the device lacked is absent
                ax.plot(ms, [r["bf16_us"] / r[key] for r in rows], marker="o", label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("rows M")
    axes[0].set_ylabel("speed-up over bf16 cuBLAS")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def sweep_main(doc: str, default_out: str, rows: tuple[int, ...],
               measure: Callable[[torch.device, tuple[int, ...]], list[dict]],
               series: dict[str, str]) -> None:
    """``--out`` / ``--rows`` / ``--plot JSON`` (redraw only); exits without a CUDA device."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--rows", default=",".join(map(str, rows)))
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an earlier run")
    args = ap.parse_args()
    if args.plot:
        plot_speedups(json.loads(Path(args.plot).read_text())["results"],
                      Path(args.plot).with_suffix(".png"), series)
        return
    if not torch.cuda.is_available():
        sys.exit(f"{Path(sys.argv[0]).name} needs a CUDA device")
    t0 = time.time()
    results = measure(torch.device("cuda"), tuple(int(r) for r in args.rows.split(",")))
    out = Path(args.out)
    out.write_text(json.dumps({
        "device": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "command": " ".join(sys.argv), "results": results, "seconds": time.time() - t0},
        indent=1))
    plot_speedups(results, out.with_suffix(".png"), series)
    print(f"wrote {out} in {time.time() - t0:.0f} s")
