"""Tune fused MoE's grouped-GEMM tiles on this GPU and write them as data
(``platforms/triton/moe_tuned/<device>.json``, read by ``moe_tuned.tuned_configs``).

For each expert shape (Qwen3-30B-A3B; DeepSeek-V2-Lite with its two shared experts fused,
as the engine runs it) and each token count from 16 to 8192 (the grouped path starts above
64 pairs), every candidate tile of the two grouped GEMMs (:func:`candidates`: ``BLOCK_M`` near
the mean rows per expert, ``BLOCK_N`` 64-256, ``BLOCK_K`` 64/128, 4/8 warps, 3/4 stages,
within the shared memory) is timed as a decode graph runs it (two layers' weights alternate,
each 1.1-1.2 GB, so the weights stream from device memory; replayed from a CUDA graph,
median of 5) and checked against the heuristic default's output. The fastest pair sharing a
``BLOCK_M`` wins. Then the whole grouped path (alignment, both GEMMs, the sum over ``k``) is
timed three ways: the torch alignment with the heuristic tiles (before), the one-launch
alignment with the heuristic tiles, and with the tuned tiles.

Candidates compile first in ``--jobs`` worker processes (Triton's disk cache), so the timing
process only loads them. ``--budget-s`` stops the sweep (the best so far is kept; buckets not
reached keep no entry). Usage on the GPU::

    python3 benchmarks/moe_tune.py --out moe_tune.json [--table-dir DIR]

writes the report (every timing) to ``--out``, a PNG beside it, and merges the winners into
the device's table file in ``--table-dir`` (default: the package's ``moe_tuned``). ``--smoke``
runs a tiny shape on CPU through the Triton interpreter (timings meaningless).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_decode_sweep import MoEShape, rel_err, routing, wall_us  # noqa: E402
from roofline import graph_us  # noqa: E402

from heteroserve.platforms.triton import moe as moe_mod  # noqa: E402
from heteroserve.platforms.triton.moe_align import align_pairs, align_pairs_torch  # noqa: E402
from heteroserve.platforms.triton.moe_gemm import Config, moe_configs, moe_gemm  # noqa: E402
from heteroserve.platforms.triton.moe_tuned import (  # noqa: E402
    TUNED_DIR, shape_key, table_file,
)

MODELS = [MoEShape("qwen3-30b-a3b", 2048, 768, 128, 8),
          MoEShape("deepseek-v2-lite-shared-fused", 2048, 1408, 66, 8)]
TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SMOKE_MODEL = MoEShape("smoke", 64, 32, 6, 3)
SMEM_BYTES = 200 * 1024
LAYERS = 2


def candidates(num_pairs: int, experts: int, gated: bool, elem_bytes: int = 2
               ) -> list[Config]:
    """Tiles worth timing: ``BLOCK_M`` from an eighth of the mean rows per expert (at least
    16, at most 64) to twice it, the rest a grid, minus tiles whose pipeline would not fit
    the shared memory and 8 warps on tiles under 64x128."""
    avg = num_pairs / experts
    out = []
    for bm in (16, 32, 64, 128):
        if not min(64, avg / 8) <= bm <= max(16, 2 * avg):
            continue
        for bn in (64, 128, 256):
            for bk in (64, 128):
                for warps in (4, 8):
                    if warps == 8 and bm * bn < 64 * 128:
                        continue
                    for stages in (3, 4):
                        tiles = bm * bk + (2 if gated else 1) * bk * bn
                        if stages * tiles * elem_bytes <= SMEM_BYTES:
                            out.append((bm, bn, bk, warps, stages))
    return out


def _compile_one(job: tuple[MoEShape, bool, Config]) -> None:
    """Run one candidate once on a tiny problem with the real strides (worker process): the
    kernel lands in Triton's disk cache. A rejected tile raises (see :func:`_compile_safe`)."""
    shape, gated, cfg = job
    dev = torch.device("cuda")
    h, i = shape.hidden, shape.inter
    x = torch.randn(2, h, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2, 2 * i if gated else h, h if gated else i, device=dev,
                    dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1] * (shape.top_k // 2)] * 2, dtype=torch.int32, device=dev)
    pairs = align_pairs(ids, 2, cfg[0])
    n = ids.numel()
    if gated:
        out = torch.empty(n, i, device=dev, dtype=torch.bfloat16)
        moe_gemm(x, w, out, pairs, shape.top_k, True, None, cfg)
    else:
        out = torch.empty(n, h, device=dev, dtype=torch.bfloat16)
        route = torch.ones(n, device=dev)
        moe_gemm(torch.randn(n, i, device=dev, dtype=torch.bfloat16), w, out, pairs, 1,
                 False, route, cfg)
    torch.cuda.synchronize()


def _compile_safe(job: tuple[MoEShape, bool, Config]) -> tuple[tuple, str | None]:
    try:
        _compile_one(job)
        return (job[1], job[2]), None
    except Exception as e:  # noqa: BLE001 - a rejected tile is a row, not a crash
        return (job[1], job[2]), str(e).splitlines()[0][:200]


def precompile(jobs: list[tuple[MoEShape, bool, Config]], workers: int) -> dict[tuple, str]:
    """Compile every job in ``workers`` spawned processes; ``{(gated, config): error}`` of
    the rejected ones."""
    if workers <= 1:
        results = [_compile_safe(j) for j in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_compile_safe, jobs, chunksize=1)
    return {key: err for key, err in results if err}


class Problem:
    """One shape at one token count: ``LAYERS`` weight sets, the routed inputs, and the
    heuristic tiles' outputs that every candidate is checked against."""

    def __init__(self, shape: MoEShape, tokens: int, weights: tuple[list, list],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.tokens = shape, tokens
        self.w13, self.w2 = weights
        g = torch.Generator().manual_seed(tokens)
        tw, ids = routing(1, tokens, shape, g)
        self.tw, self.ids = tw[0].to(device), ids[0].to(device)
        self.x = (torch.randn(tokens, shape.hidden, generator=g)).to(device, dtype)
        self.pairs = tokens * shape.top_k
        self.route = self.tw.reshape(-1).contiguous()
        self.inter = torch.empty(self.pairs, shape.inter, device=device, dtype=dtype)
        self.out = torch.empty(self.pairs, shape.hidden, device=device, dtype=dtype)
        self.default = moe_configs(self.pairs, shape.experts, dtype, device)
        self._aligned: dict[int, object] = {}
        self.ref_inter = self.gate_up(self.default[0]).clone()
        self.ref_out = self.down(self.default[1]).clone()

    def aligned(self, block_m: int):
        if block_m not in self._aligned:
            self._aligned[block_m] = align_pairs(self.ids, self.shape.experts, block_m)
        return self._aligned[block_m]

    def gate_up(self, cfg: Config, layer: int = 0) -> torch.Tensor:
        return moe_gemm(self.x, self.w13[layer], self.inter, self.aligned(cfg[0]),
                        self.shape.top_k, True, None, cfg)

    def down(self, cfg: Config, layer: int = 0) -> torch.Tensor:
        return moe_gemm(self.ref_inter, self.w2[layer], self.out, self.aligned(cfg[0]), 1,
                        False, self.route, cfg)

    def fused(self, configs: tuple[Config, Config] | None, layer: int = 0) -> torch.Tensor:
        return moe_mod.grouped_moe(self.x, self.w13[layer], self.w2[layer], self.tw, self.ids,
                                   configs=configs)


def time_calls(fn: Callable[[int], object], device: torch.device) -> float:
    calls = [lambda n=n: fn(n) for n in range(LAYERS)]
    return graph_us(calls) if device.type == "cuda" else wall_us(calls)


def sweep_problem(p: Problem, rejected: dict[tuple, str], device: torch.device,
                  deadline: float, rows: list[dict], limit: int | None = None) -> dict | None:
    """Time every candidate of both GEMMs of ``p`` (appending a row each to ``rows``); the
    winning entry, or None when the deadline passed before any pair of one ``BLOCK_M``."""
    base = {"model": p.shape.name, "tokens": p.tokens, "pairs": p.pairs}
    best: dict[str, dict[int, tuple[float, Config]]] = {"gate_up": {}, "down": {}}
    for kernel, gated, run, ref in (("gate_up", True, p.gate_up, p.ref_inter),
                                    ("down", False, p.down, p.ref_out)):
        for cfg in candidates(p.pairs, p.shape.experts, gated)[:limit]:
            row = {**base, "kernel": kernel, "config": list(cfg)}
            if (gated, cfg) in rejected:
                rows.append({**row, "error": rejected[(gated, cfg)]})
                continue
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": "time budget"})
                continue
            err = rel_err(run(cfg), ref.double())
            us = time_calls(lambda n, c=cfg: run(c, n), device)
            rows.append({**row, "us": us, "rel_err_vs_default": err})
            if err < 2e-2 and us < best[kernel].get(cfg[0], (float("inf"),))[0]:
                best[kernel][cfg[0]] = (us, cfg)
    totals = {bm: best["gate_up"][bm][0] + best["down"][bm][0]
              for bm in best["gate_up"] if bm in best["down"]}
    if not totals:
        return None
    bm = min(totals, key=totals.__getitem__)
    return {"gate_up": list(best["gate_up"][bm][1]), "down": list(best["down"][bm][1]),
            "us": totals[bm]}


def compare_paths(p: Problem, tuned: tuple[Config, Config], device: torch.device) -> dict:
    """The whole grouped path three ways (us per call) and its error against the default."""
    ref = p.fused(p.default).double()
    out = {}
    original = moe_mod.align_pairs
    try:
        moe_mod.align_pairs = align_pairs_torch
        out["torch_align_default_us"] = time_calls(lambda n: p.fused(p.default, n), device)
    finally:
        moe_mod.align_pairs = original
    out["default_us"] = time_calls(lambda n: p.fused(p.default, n), device)
    out["tuned_us"] = time_calls(lambda n: p.fused(tuned, n), device)
    out["tuned_rel_err"] = rel_err(p.fused(tuned), ref)
    bm = tuned[0][0]
    out["align_torch_us"] = time_calls(
        lambda n: align_pairs_torch(p.ids, p.shape.experts, bm), device)
    out["align_us"] = time_calls(lambda n: align_pairs(p.ids, p.shape.experts, bm), device)
    return out


def run(models: list[MoEShape], tokens: tuple[int, ...], device: torch.device,
        budget_s: float, jobs: int, limit: int | None = None) -> dict:
    """Precompile, sweep every model x token count (the first ``limit`` candidates of each
    kernel), compare the paths; the report."""
    began = time.monotonic()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # one compile serves every shape: the kernels specialise on the strides' divisibility
    # by 16, which all the shapes share
    work = [(models[0], gated, c) for gated, c in sorted(
        {(gated, c) for m in models for t in tokens for gated in (True, False)
         for c in candidates(t * m.top_k, m.experts, gated)})]
    rejected = precompile(work, jobs) if device.type == "cuda" else {}
    print(f"[{time.monotonic() - began:.0f} s] compiled {len(work)} tiles, "
          f"{len(rejected)} rejected", flush=True)
    rows: list[dict] = []
    entries: dict[str, dict[str, dict]] = {}
    deadline = began + budget_s
    for shape in models:
        g = torch.Generator(device=device).manual_seed(0)
        h, i, e = shape.hidden, shape.inter, shape.experts
        weights = ([torch.randn(e, 2 * i, h, generator=g, device=device, dtype=dtype) * h ** -0.5
                    for _ in range(LAYERS)],
                   [torch.randn(e, h, i, generator=g, device=device, dtype=dtype) * i ** -0.5
                    for _ in range(LAYERS)])
        key = shape_key(dtype, e, h, i)
        for t in tokens:
            p = Problem(shape, t, weights, device, dtype)
            win = sweep_problem(p, rejected, device, deadline, rows, limit)
            if win is None:
                continue
            win.update(compare_paths(p, (tuple(win["gate_up"]), tuple(win["down"])), device))
            win["default"] = [list(c) for c in p.default]
            entries.setdefault(key, {})[str(p.pairs)] = win
            print(f"[{time.monotonic() - began:.0f} s] {shape.name} T={t}: "
                  f"{win['torch_align_default_us']:.1f} -> {win['default_us']:.1f} "
                  f"(one-launch align) -> {win['tuned_us']:.1f} us (tuned "
                  f"{win['gate_up']} / {win['down']}), align {win['align_torch_us']:.1f} -> "
                  f"{win['align_us']:.1f} us", flush=True)
        del weights
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "torch": torch.__version__, "dtype": str(dtype), "layers": LAYERS,
            "seconds": time.monotonic() - began, "tables": entries, "rows": rows}


def write_table(report: dict, table_dir: Path) -> Path:
    """Merge the report's winners into the device's table file (other shapes kept)."""
    path = table_dir / table_file(report["device"]).name
    old = json.loads(path.read_text()) if path.is_file() else {}
    tables = old.get("tables", {})
    for key, entries in report["tables"].items():
        tables[key] = {pairs: {k: round(v, 1) if isinstance(v, float) else v
                               for k, v in e.items()
                               if k in ("gate_up", "down", "us", "default_us", "tuned_us",
                                        "torch_align_default_us")}
                       for pairs, e in entries.items()}
    table = {k: report[k] for k in ("device", "date", "command", "torch")}
    table["commit"] = os.environ.get("HS_COMMIT", "")
    table["tables"] = tables
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(table, indent=1)
    # one line per tile config
    text = re.sub(r"\[\s*([0-9,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n")
    return path


def plot(report: dict, path: Path) -> bool:
    """Speed-up of the whole grouped path over the torch-aligned heuristic, per shape."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, entries in report["tables"].items():
        pairs = sorted(entries, key=int)
        for label, col in (("one-launch align", "default_us"), ("+ tuned tiles", "tuned_us")):
            ax.plot([int(q) for q in pairs],
                    [entries[q]["torch_align_default_us"] / entries[q][col] for q in pairs],
                    marker="o", label=f"{key}: {label}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pairs (tokens x k)")
    ax.set_ylabel("speed-up over torch align + heuristic tiles")
    ax.set_title(f"fused MoE grouped path, {report['device']}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def parse_shape(spec: str) -> MoEShape:
    """``"E,H,I,K"`` -> a shape named after it. Raises ``SystemExit`` on a malformed spec."""
    try:
        e, h, i, k = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"moe_tune: --shape wants E,H,I,K (four ints), got {spec!r}") from None
    return MoEShape(f"E{e}-H{h}-I{i}-k{k}", h, i, e, k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_tune.json")
    ap.add_argument("--table-dir", type=Path, default=TUNED_DIR)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--shape", action="append", default=[], metavar="E,H,I,K",
                    help="an expert shape to tune instead of the defaults: experts, hidden, "
                         "intermediate per rank, experts per token (repeatable)")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny shape on CPU through the Triton interpreter (checks the script)")
    a = ap.parse_args()
    tokens = tuple(int(t) for t in a.tokens.split(","))
    if a.smoke:
        report = run([SMOKE_MODEL], (40,), torch.device("cpu"), a.budget_s, 1, limit=2)
    elif not torch.cuda.is_available():
        print("moe_tune: needs a CUDA GPU (--smoke checks the script on CPU); skipped")
        return 0
    else:
        models = [parse_shape(spec) for spec in a.shape] or MODELS
        report = run(models, tokens, torch.device("cuda"), a.budget_s, a.jobs)
    out = Path(a.out)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {write_table(report, a.table_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
