"""The one-row 4-bit GEMV through the TMA pipeline (``platforms/triton/w4a16_gemv_tma.py``)
against the register-tile kernel at its launch rule (``w4a16_gemv.choose_w4_config``), at
Llama-3.1-8B's four projection shapes, on the GPU.

Both run on the same AWQ-layout weights, loaded through the real linear method; enough
copies rotate that the set exceeds the L2, and each call is timed by replaying one CUDA graph
(``quant_gemv_sweep.graph_us``). Bandwidth counts the bytes a call reads (words, zero points,
scales) next to the copy bandwidth measured in the same run; each TMA output is compared with
the register-tile kernel's. A configuration the compiler or the TMA rejects is a row with its
error. Writes JSON (and a PNG of the fraction of the copy rate per shape with ``--plot``).

Usage: ``python benchmarks/w4_tma_sweep.py --out w4_tma.json`` (about a minute on an H100);
``--install`` also writes the device's table of shapes where the TMA kernel won
(``platforms/triton/w4_gemv_tuned.py``), which the W4A16 linears then use;
``--table-from SWEEP.json`` writes that table from an earlier sweep, without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_gemv_sweep import (  # noqa: E402
    GROUP, L2_MULTIPLE, SHAPES, build_layer, checkpoint, graph_us, rel_err, weight_bytes,
)

SCHEME = "awq_w4a16"


def tma_configs(quick: bool = False) -> list[object]:
    """The TMA grid: 16/32 columns; 16 KiB tiles on 4 warps or 32 KiB on 8 (a thread holds
    32 words either way); 2 or 4 stages. ``quick``: 16 columns, 16 KiB, 2 and 4 stages."""
    from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig

    if quick:
        return [W4TmaConfig(16, 256, 4, 2), W4TmaConfig(16, 256, 4, 4)]
    out = []
    for bn in (16, 32):
        for tile_kib, warps in ((16, 4), (32, 8)):
            block_kw = tile_kib * 1024 // (4 * bn)
            for stages in (2, 4):
                if block_kw // 4 <= 256:  # a TMA box edge is at most 256 elements
                    out.append(W4TmaConfig(bn, block_kw, warps, stages))
    return out


def measure(name: str, n: int, k: int, copy_bps: float, quick: bool = False,
            reg_grid: bool = False) -> list[dict]:
    from heteroserve.platforms.triton import w4a16_gemv as w4
    from heteroserve.platforms.triton.w4a16_gemv_tma import w4a16_gemv_tma

    device = torch.device("cuda")
    gen = torch.Generator(device).manual_seed(n * 7 + k)
    x = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)
    ckpt = checkpoint(SCHEME, n, k, device, gen)
    method, first = build_layer(SCHEME, n, k, ckpt)
    nbytes = weight_bytes(first)
    layers = [first] + [build_layer(SCHEME, n, k, ckpt)[1]
                        for _ in range(max(1, -(-L2_MULTIPLE // nbytes)) - 1)]
    group = k // first.w4_zeros.shape[0]

    def reg_tile(lay: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return w4.w4a16_gemv(x, lay.w4_qweight, lay.w4_zeros, lay.w4_scales, group)

    ref = reg_tile(first, x)
    rows = []

    def row(path: str, config: dict, t: float, err: float) -> dict:
        r = {"shape": name, "N": n, "K": k, "group": group, "path": path, "config": config, "us": t,
             "GBps": nbytes / t / 1e3, "frac_copy": nbytes / (t * 1e-6) / copy_bps,
             "rel_err_vs_reg_tile": err}
        print(f"{name:13s} {path:9s} {t:8.2f} us {r['frac_copy']:6.1%} of copy "
              f"err {err:.1e} {config}", flush=True)
        return r

    default = w4.choose_w4_config(n, k, 1, device)
    rows.append(row("reg_tile", default.__dict__, graph_us(reg_tile, layers, x, 200), 0.0))
    best = None
    for cfg in tma_configs(quick):
        def call(lay: torch.nn.Module, x: torch.Tensor, cfg=cfg) -> torch.Tensor:
            return w4a16_gemv_tma(x, lay.w4_qweight, lay.w4_zeros, lay.w4_scales, group, cfg)
        try:
            err = rel_err(call(first, x), ref)
            r = row("tma", cfg.__dict__, graph_us(call, layers, x, 200), err)
        except Exception as e:  # noqa: BLE001 - a rejected config is a row
            rows.append({"shape": name, "path": "tma", "config": cfg.__dict__,
                         "error": str(e)[:300]})
            print(f"{name:13s} tma rejected {cfg}: {str(e)[:120]}", flush=True)
            continue
        rows.append(r)
        if err < 1e-2 and (best is None or r["us"] < best["us"]):
            best = r
    if reg_grid:
        rows += _reg_grid(name, layers, x, ref, row)
    if best is not None:
        rows.append({**best, "path": "tma_best"})
        print(f"{name:13s} tma best {best['us']:.2f} us ({best['frac_copy']:.1%}) against "
              f"{rows[0]['us']:.2f} us ({rows[0]['frac_copy']:.1%}) {best['config']}",
              flush=True)
    return rows


#: sweep rows that are a shape's best configuration of one kernel, and that kernel
BEST_ROWS = {"tma_best": "tma", "reg_best": "reg_tile", "sweep_best": "reg_tile"}
#: sweep rows that time the register-tile kernel at its launch rule (the baseline)
RULE_ROWS = ("reg_tile", "new")


def tuned_table(sweeps: list[dict], sources: list[str]) -> dict:
    """The ``w4_gemv_tuned`` table (``platforms/triton/w4_gemv_tuned.py``'s format) of one
    device's sweeps: this script's JSON and ``quant_gemv_sweep.py --sweep``'s (its
    ``sweep_best`` rows are register-tile configurations). Per shape, the fastest best row of
    either kernel, where it beat the register-tile rule (the first sweep's rule row) by
    ``MIN_GAIN``. Rows without a ``group`` (sweeps before it was recorded) are the sweeps'
    group, 128. Raises ``ValueError`` when the sweeps are of different devices."""
    from heteroserve.platforms.triton.w4_gemv_tuned import MIN_GAIN, shape_key

    if len({s["device"] for s in sweeps}) != 1:
        raise ValueError(f"sweeps of several devices: {sorted({s['device'] for s in sweeps})}")
    rule_us: dict[tuple[int, int, int], float] = {}
    best: dict[tuple[int, int, int], dict] = {}
    for sweep in sweeps:
        for r in sweep["rows"]:
            if "us" not in r:  # a configuration the compiler rejected
                continue
            key = (r["N"], r["K"], r.get("group", GROUP))
            if r.get("path") in RULE_ROWS:
                rule_us.setdefault(key, r["us"])
            elif r.get("path") in BEST_ROWS and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
    shapes = {}
    for key, r in best.items():
        if key not in rule_us or r["us"] > (1 - MIN_GAIN) * rule_us[key]:
            continue
        c, kernel = r["config"], BEST_ROWS[r["path"]]
        entry = {"kernel": kernel,
                 "config": [c["block_n"], c["block_kw"], c["num_warps"], c["num_stages"]]}
        if kernel == "tma":
            entry["prefetch_l2"] = bool(c.get("prefetch_l2", False))
        else:
            entry["prefetch"] = bool(c.get("prefetch", False))
        shapes[shape_key(*key)] = {**entry, "us": round(r["us"], 3),
                                   "rule_us": round(rule_us[key], 3)}
    return {"device": sweeps[0]["device"], "date": max(s["date"] for s in sweeps),
            "commands": [s["command"] for s in sweeps], "sources": sources, "shapes": shapes}


def install(sweeps: list[dict], sources: list[str]) -> Path:
    """Write :func:`tuned_table` of ``sweeps`` to ``platforms/triton/w4_gemv_tuned/``."""
    from heteroserve.platforms.triton.w4_gemv_tuned import table_file

    path = table_file(sweeps[0]["device"])
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(tuned_table(sweeps, sources), indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def _reg_grid(name: str, layers: list, x: torch.Tensor, ref: torch.Tensor, row) -> list[dict]:
    """The register-tile kernel at each launch shape of ``quant_gemv_sweep.py --sweep``
    (subnormal decoding only), and the fastest as a ``reg_best`` row."""
    from quant_gemv_sweep import config_calls

    rows, best = [], None
    for config, call in config_calls(SCHEME, layers[0]):
        if config.get("nibble") != "subnormal":
            continue
        r = row("reg", config, graph_us(call, layers, x, 200), rel_err(call(layers[0], x), ref))
        rows.append(r)
        if best is None or r["us"] < best["us"]:
            best = r
    if best is not None:
        rows.append({**best, "path": "reg_best"})
        print(f"{name:13s} reg best {best['us']:.2f} us {best['config']}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    from headline_report import pyplot_or_none

    plt = pyplot_or_none()
    if plt is None:
        return False
    names = [s[0] for s in SHAPES]
    series = {p: [next((r["frac_copy"] for r in rows if r.get("shape") == s
                        and r.get("path") == p), 0.0) for s in names]
              for p in ("reg_tile", "tma_best")}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, (p, vals) in enumerate(series.items()):
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], vals, width, label=p)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("fraction of the copy rate")
    ax.set_title("4-bit GEMV, one row: register tiles vs TMA pipeline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="w4_tma.json")
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two TMA configurations a shape")
    ap.add_argument("--install", action="store_true",
                    help="write the device's platforms/triton/w4_gemv_tuned table")
    ap.add_argument("--table-from", metavar="JSON", nargs="+",
                    help="no GPU: write the tuned table of earlier sweeps' JSON (this "
                    "script's and quant_gemv_sweep.py --sweep's, one device)")
    ap.add_argument("--reg-grid", action="store_true",
                    help="also time the register-tile kernel's launch shapes (reg_best)")
    a = ap.parse_args(argv)
    if a.table_from:
        install([json.loads(Path(p).read_text()) for p in a.table_from], a.table_from)
        return 0
    from roofline import copy_bandwidth

    copy_bps = copy_bandwidth()
    device_name = torch.cuda.get_device_name()
    print(f"device {device_name}, copy bandwidth {copy_bps / 1e12:.2f} TB/s", flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name, n, k in SHAPES:
        rows += measure(name, n, k, copy_bps, a.quick, a.reg_grid)
    out = Path(a.out)
    sweep = {
        "device": device_name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv), "triton": __import__("triton").__version__,
        "copy_bandwidth_Bps": copy_bps, "seconds": time.perf_counter() - t0, "rows": rows}
    out.write_text(json.dumps(sweep, indent=2))
    if a.install:
        install([sweep], [str(out)])
    if a.plot:
        plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
