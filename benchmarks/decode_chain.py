"""Batch-1 decode's weight streams as a decode graph runs them: each model's one-row linears
(and its fused MoE decode kernels) launched back to back with PDL from one CUDA graph, over
enough distinct weight copies that every launch streams from device memory, for each
candidate launch shape and for each GEMV launch rule (``RULES``).

Three tables:

- ``shapes``: per linear shape of each model, every candidate ``GemvConfig`` (``block_n`` 1-16,
  ``block_k`` 512-4096, 4 or 8 warps, tiles up to 32 KiB), microseconds per launch and the
  fraction of the copy bandwidth measured in the same run.
- ``chains``: per model and rule, one decode layer's linears in order (e.g. Qwen3's qkv, o,
  router), layer after layer over distinct weights: microseconds per layer.
- ``moe``: the fused MoE decode kernels (``moe_decode.decode_moe``, one token) over distinct
  layers of experts: the default tiles, then each down tile with the default gate-up tile and
  each gate-up tile with the default down tile.

Usage on the GPU: ``python3 benchmarks/decode_chain.py --out chain.json [--models qwen3moe,...]
[--budget-s 400]``; writes the JSON and a PNG beside it. ``--smoke`` runs tiny shapes on the
CPU through the Triton interpreter (timings meaningless; checks every path runs and is right).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_rule import RULES  # noqa: E402
from moe_decode_sweep import rel_err, wall_us  # noqa: E402

from heteroserve.platforms.triton.gemv import GemvConfig, gemv  # noqa: E402
from heteroserve.platforms.triton.moe_decode import (  # noqa: E402
    DecodeConfig, DecodeTile, choose_config as moe_choose_config, decode_moe,
)

#: bytes of distinct weights a timed graph cycles through (several times the H200's 50 MB L2)
STREAM_BYTES = 400 * 2**20


@dataclass(frozen=True)
class Experts:
    """Routed experts as the engine stores them (shared experts fused as more experts)."""

    experts: int
    hidden: int
    inter: int
    top_k: int


@dataclass(frozen=True)
class Model:
    """A model's one-row linears per decode layer, in order, ``(name, N, K)``, and its MoE."""

    linears: tuple[tuple[str, int, int], ...]
    experts: Experts | None = None


MODELS = {
    "llama8b": Model((("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                      ("down", 4096, 14336))),
    "qwen3moe": Model((("qkv", 5120, 2048), ("o", 2048, 4096), ("router", 128, 2048)),
                      Experts(128, 2048, 768, 8)),
    "deepseek_v2_lite": Model((("q_kv_a", 3648, 2048), ("o", 2048, 2048), ("router", 64, 2048)),
                              Experts(66, 2048, 1408, 8)),
    "gemma3_12b": Model((("qkv", 8192, 3840), ("o", 3840, 4096), ("gate_up", 30720, 3840),
                         ("down", 3840, 15360))),
}
SMOKE_MODELS = {"smoke": Model((("a", 48, 160), ("b", 16, 96)), Experts(6, 64, 32, 3))}


def candidates(k: int, smoke: bool) -> list[GemvConfig]:
    """Launch shapes worth timing for a ``K``-wide weight (bf16 tiles up to 32 KiB)."""
    if smoke:
        return [GemvConfig(16, 64, 1, 1), GemvConfig(8, 128, 1, 1)]
    out = []
    for bn in (1, 2, 4, 8, 16):
        for bk in (512, 1024, 2048, 4096):
            if bk > max(512, triton.next_power_of_2(k)) or bn * bk * 2 > 32768:
                continue
            out += [GemvConfig(bn, bk, 4, 1), GemvConfig(bn, bk, 8, 1)]
    return out


def copies(nbytes: int, smoke: bool) -> int:
    return 1 if smoke else max(2, -(-STREAM_BYTES // nbytes))


def timer(smoke: bool) -> Callable[[list[Callable[[], object]]], float]:
    """Microseconds per call: graph replay on the GPU, one host-timed pass in smoke runs."""
    if smoke:
        return wall_us
    from roofline import graph_us
    return graph_us


def shape_rows(model: str, spec: Model, device: torch.device, copy_bps: float, smoke: bool,
               deadline: float) -> list[dict]:
    """Every candidate launch shape of each linear of ``spec`` (see the module)."""
    rows = []
    measure = timer(smoke)
    for name, n, k in spec.linears:
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
              for _ in range(copies(n * k * 2, smoke))]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        ref = x.double() @ ws[0].double().T
        default = RULES["default"](n, k, device)
        best = dflt = None
        for cfg in dict.fromkeys([default, *candidates(k, smoke)]):
            if time.monotonic() > deadline:
                break
            err = rel_err(gemv(x, ws[0], config=cfg, static_weight=True), ref)
            us = measure([lambda w=w, c=cfg: gemv(x, w, config=c, static_weight=True)
                          for w in ws])
            row = {"model": model, "linear": name, "N": n, "K": k, "config": cfg.__dict__,
                   "default": cfg == default, "us": us,
                   "frac_copy": n * k * 2 / (us * 1e-6) / copy_bps, "rel_err": err}
            if err > 2e-2:
                raise AssertionError(f"decode_chain: {row} is wrong")
            rows.append(row)
            best = row if best is None or us < best["us"] else best
            dflt = row if cfg == default else dflt
        if best is not None and dflt is not None:
            print(f"{model:17s} {name:8s} N={n:6d} K={k:5d} default {dflt['us']:7.2f} us "
                  f"({dflt['frac_copy']:6.1%}) best {best['us']:7.2f} us "
                  f"({best['frac_copy']:6.1%}) {best['config']}", flush=True)
        del ws
    return rows


def chain_rows(model: str, spec: Model, device: torch.device, copy_bps: float, smoke: bool,
               rules: list[str]) -> list[dict]:
    """One decode layer's linears in order over distinct layers, per rule (see the module)."""
    layer_bytes = sum(n * k * 2 for _, n, k in spec.linears)
    layers = copies(layer_bytes, smoke)
    weights = [[torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                for _, n, k in spec.linears] for _ in range(layers)]
    xs = {k: torch.randn(1, k, device=device, dtype=torch.bfloat16) for _, _, k in spec.linears}
    measure = timer(smoke)
    rows = []
    for rule in rules:
        cfgs = [RULES[rule](n, k, device) for _, n, k in spec.linears]
        calls = [lambda w=w, c=c, x=xs[w.shape[1]]: gemv(x, w, config=c, static_weight=True)
                 for layer in weights for w, c in zip(layer, cfgs)]
        us = measure(calls) * len(spec.linears)
        rows.append({"model": model, "rule": rule, "us_per_layer": us,
                     "frac_copy": layer_bytes / (us * 1e-6) / copy_bps,
                     "configs": {name: c.__dict__ for (name, _, _), c in zip(spec.linears, cfgs)}})
        print(f"{model:17s} chain {rule:10s} {us:8.2f} us a layer "
              f"{rows[-1]['frac_copy']:6.1%} of copy", flush=True)
    return rows


def moe_tiles(default: DecodeConfig, smoke: bool) -> list[DecodeConfig]:
    """The default, each down tile with the default gate-up tile, and the reverse."""
    if smoke:
        return [default, replace(default, down=DecodeTile(4, 16, 1))]
    downs = [DecodeTile(bn, bk) for bn in (1, 2, 4) for bk in (128, 256, 512)]
    ups = [DecodeTile(bn, bk) for bn in (4, 8, 16) for bk in (128, 256, 512)]
    return list(dict.fromkeys([default] + [replace(default, down=d) for d in downs]
                              + [replace(default, gate_up=g) for g in ups]))


def moe_rows(model: str, e: Experts, device: torch.device, copy_bps: float, smoke: bool,
             deadline: float) -> list[dict]:
    """The fused MoE decode kernels for one token over distinct layers (see the module)."""
    gen = torch.Generator(device).manual_seed(0)
    routed = e.top_k * 3 * e.inter * e.hidden * 2  # the bytes one call reads
    layers = copies(routed, smoke)
    w13 = [torch.randn(e.experts, 2 * e.inter, e.hidden, device=device, generator=gen,
                       dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    w2 = [torch.randn(e.experts, e.hidden, e.inter, device=device, generator=gen,
                      dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x = torch.randn(1, e.hidden, device=device, dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(e.experts, device=device, generator=gen)[:e.top_k]
                       for _ in range(layers)]).to(torch.int32)[:, None, :]
    tw = torch.softmax(torch.randn(layers, 1, e.top_k, device=device, generator=gen), -1)
    default = moe_choose_config(1, e.top_k, e.hidden, e.inter, torch.bfloat16, device)
    ref = decode_moe(x, w13[0], w2[0], tw[0], ids[0], config=default)
    measure = timer(smoke)
    rows = []
    for cfg in moe_tiles(default, smoke):
        if time.monotonic() > deadline:
            break
        try:
            err = rel_err(decode_moe(x, w13[0], w2[0], tw[0], ids[0], config=cfg), ref)
        except Exception as exc:  # noqa: BLE001 - a rejected tile is a row
            rows.append({"model": model, "config": _moe_dict(cfg), "error": str(exc)[:200]})
            continue
        us = measure([lambda i=i, c=cfg: decode_moe(x, w13[i], w2[i], tw[i], ids[i], config=c)
                      for i in range(layers)])
        rows.append({"model": model, "config": _moe_dict(cfg), "default": cfg == default,
                     "us": us, "frac_copy": routed / (us * 1e-6) / copy_bps, "rel_err": err})
        print(f"{model:17s} moe {_moe_dict(cfg)} {us:7.2f} us "
              f"{rows[-1]['frac_copy']:6.1%} of copy", flush=True)
    return rows


def _moe_dict(cfg: DecodeConfig) -> dict:
    return {"gate_up": [cfg.gate_up.block_n, cfg.gate_up.block_k],
            "down": [cfg.down.block_n, cfg.down.block_k]}


def plot(report: dict, path: Path) -> bool:
    """Per model: each rule's layer time next to the copy floor; False without matplotlib."""
    from headline_report import pyplot_or_none

    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, fracs = [], []
    for row in report["chains"]:
        labels.append(f"{row['model']}\n{row['rule']}")
        fracs.append(row["frac_copy"])
    ax.bar(range(len(fracs)), fracs)
    ax.set_xticks(range(len(fracs)), labels, fontsize=6, rotation=60)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("one layer's linears, fraction of copy bandwidth")
    ax.set_title(f"batch-1 GEMV chains per launch rule, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="decode_chain.json")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--tables", default="chains,moe,shapes")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="stop starting new timings after this many seconds")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + a.budget_s
    smoke = a.smoke
    device = torch.device("cpu" if smoke and not torch.cuda.is_available() else "cuda")
    if smoke:
        models, copy_bps = SMOKE_MODELS, 1e9
    else:
        from roofline import copy_bandwidth
        models = {m: MODELS[m] for m in a.models.split(",")}
        copy_bps = copy_bandwidth()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"device {name}, copy bandwidth {copy_bps / 1e12:.2f} TB/s", flush=True)
    tables = a.tables.split(",")
    report: dict = {"device": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(sys.argv), "copy_bandwidth_Bps": copy_bps,
                    "chains": [], "moe": [], "shapes": []}
    for table in tables:
        for model, spec in models.items():
            if table == "chains":
                report["chains"] += chain_rows(model, spec, device, copy_bps, smoke,
                                               a.rules.split(","))
            elif table == "moe" and spec.experts is not None:
                report["moe"] += moe_rows(model, spec.experts, device, copy_bps, smoke,
                                          deadline)
            elif table == "shapes":
                report["shapes"] += shape_rows(model, spec, device, copy_bps, smoke, deadline)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report["seconds"] = time.monotonic() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} in {report['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
