"""Fused MoE at decode sizes on the GPU: the grouped-GEMM path (``grouped_moe``: pair sorting
+ two grouped GEMMs + a sum over k) against the few-token path (``decode_moe``: two GEMV-style
kernels), for the expert shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite at T = 1..16 tokens.

Each configuration is timed as a decode graph runs it: ``LAYERS`` calls, each with its own
expert weights (so nothing stays in the L2 from one call to the next) and its own uniform
random routing, are captured in one CUDA graph and the replay is timed with events (median of
several). Bandwidth counts the bytes of the routed experts a call must read, each distinct
expert once (``w13[e]`` and ``w2[e]``, bf16), and is reported as a fraction of the copy
bandwidth measured in the same run (a device-to-device copy of 1 GiB, bytes read + written
per second, as ``roofline.copy_bandwidth``). Every path is checked against a float64 product
first. A small sweep of the decode kernels' launch shapes follows at T = 1 and 8, within the
time left of ``BUDGET_S``. Usage: ``python benchmarks/moe_decode_sweep.py --out moe.json``;
``--smoke`` runs a tiny shape on CPU through the Triton interpreter (timing meaningless) to
check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import graph_us  # noqa: E402

from heteroserve.platforms.triton.moe import grouped_moe  # noqa: E402
from heteroserve.platforms.triton.moe_decode import (  # noqa: E402
    MAX_DECODE_PAIRS, DecodeConfig, DecodeTile, choose_config, decode_moe,
)


@dataclass(frozen=True)
class MoEShape:
    """One model's routed experts: ``w13 [experts, 2*inter, hidden]``, ``w2 [experts, hidden,
    inter]``, ``top_k`` experts per token."""

    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int

    def expert_bytes(self, elem_bytes: int) -> int:
        return 3 * self.hidden * self.inter * elem_bytes


MODELS = [MoEShape("qwen3-30b-a3b", 2048, 768, 128, 8),
          MoEShape("deepseek-v2-lite", 2048, 1408, 64, 6),
          # its 2 shared experts run as 2 more experts of every token (core/models/deepseek.py)
          MoEShape("deepseek-v2-lite-shared-fused", 2048, 1408, 66, 8)]
TOKENS = (1, 2, 4, 8, 16)
SWEEP_TOKENS = (1, 8)
LAYERS = 16
BUDGET_S = 60.0
SMOKE_MODEL = MoEShape("smoke", 32, 24, 6, 3)


def sweep_configs(default: DecodeConfig) -> list[DecodeConfig]:
    """``default`` and its neighbours, one kernel and one knob at a time: half and double the
    outputs and the K step per program, twice the warps, three pipeline stages."""
    out = [default]
    for name in ("gate_up", "down"):
        tile: DecodeTile = getattr(default, name)
        for t in (replace(tile, block_n=max(1, tile.block_n // 2)),
                  replace(tile, block_n=tile.block_n * 2),
                  replace(tile, block_k=max(16, tile.block_k // 2)),
                  replace(tile, block_k=tile.block_k * 2),
                  replace(tile, num_warps=tile.num_warps * 2),
                  replace(tile, num_stages=3)):
            out.append(replace(default, **{name: t}))
    return list(dict.fromkeys(out))


def routing(calls: int, tokens: int, shape: MoEShape, gen: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform routing per call: ``(weights fp32 [calls, T, k], ids int32 [calls, T, k])``,
    each token's ``k`` experts distinct, weights a softmax (as top-k softmax routing)."""
    scores = torch.rand(calls, tokens, shape.experts, generator=gen)
    ids = scores.topk(shape.top_k, dim=-1).indices.to(torch.int32)
    weights = torch.softmax(torch.randn(calls, tokens, shape.top_k, generator=gen), dim=-1)
    return weights, ids


def routed_bytes(ids: torch.Tensor, expert_bytes: int) -> float:
    """Mean over calls (``ids [calls, T, k]``) of the distinct experts' bytes a call reads."""
    return sum(call.unique().numel() for call in ids) / ids.shape[0] * expert_bytes


def reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, tw: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """float64 MoE of one call on ``x``'s device, one token at a time (only its experts are
    gathered, so this stays small for large expert sets)."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        e = ids[t].long()
        h = torch.einsum("kih,h->ki", w13[e].double(), x[t].double())
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = torch.einsum("khi,ki->kh", w2[e].double(), act)
        out[t] = (tw[t].double()[:, None] * y).sum(0)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def wall_us(calls: list[Callable[[], object]]) -> float:
    """Microseconds per call on the host clock, one pass after a warm-up (``--smoke``)."""
    calls[0]()
    start = time.perf_counter()
    for call in calls:
        call()
    return (time.perf_counter() - start) * 1e6 / len(calls)


def copy_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Bytes/s read + written by a device-to-device copy of ``num_bytes`` (median of 5)."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = (graph_us if device.type == "cuda" else wall_us)([lambda: dst.copy_(src)] * 5)
    return 2 * num_bytes / (us * 1e-6)


class Workload:
    """``layers`` expert sets of ``shape`` and, per token count, the routed inputs of one call
    per layer; times a path over all of them."""

    def __init__(self, shape: MoEShape, layers: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.shape, self.device, self.dtype = shape, device, dtype
        g = torch.Generator(device=device).manual_seed(0)
        h, i, e = shape.hidden, shape.inter, shape.experts
        self.w13 = [torch.randn(e, 2 * i, h, generator=g, device=device, dtype=dtype)
                    * h ** -0.5 for _ in range(layers)]
        self.w2 = [torch.randn(e, h, i, generator=g, device=device, dtype=dtype) * i ** -0.5
                   for _ in range(layers)]
        self.timer = graph_us if device.type == "cuda" else wall_us

    def inputs(self, tokens: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(tokens)
        tw, ids = routing(len(self.w13), tokens, self.shape, g)
        xs = [torch.randn(tokens, self.shape.hidden, generator=g).to(self.device, self.dtype)
              for _ in self.w13]
        return xs, tw.to(self.device), ids.to(self.device)

    def measure(self, path: Callable[..., torch.Tensor], xs: list[torch.Tensor],
                tw: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        """``(rel_err of layer 0 against ref, us per call)`` of ``path(x, w13, w2, tw, ids)``."""
        err = rel_err(path(xs[0], self.w13[0], self.w2[0], tw[0], ids[0]), ref)
        calls = [lambda n=n: path(xs[n], self.w13[n], self.w2[n], tw[n], ids[n])
                 for n in range(len(xs))]
        return err, self.timer(calls)


def run(models: list[MoEShape], tokens: tuple[int, ...], sweep_tokens: tuple[int, ...],
        layers: int, device: torch.device, copy_bytes: int, budget_s: float,
        neighbours: Callable[[DecodeConfig], list[DecodeConfig]] = sweep_configs) -> dict:
    """Every model x token count x path, then at ``sweep_tokens`` the launch shapes
    ``neighbours(default)`` while less than ``budget_s`` has passed (later ones are rows marked
    skipped; one the compiler rejects is a row with its error). Returns the report (see the
    module docstring)."""
    began = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elem = torch.finfo(dtype).bits // 8
    copy = copy_bandwidth(device, copy_bytes)
    rows: list[dict] = []
    cases = []  # (workload, tokens, inputs, reference, row base, default config)
    for shape in models:
        work = Workload(shape, layers, device, dtype)
        for t in tokens:
            xs, tw, ids = work.inputs(t)
            nbytes = routed_bytes(ids, shape.expert_bytes(elem))
            ref = reference(xs[0], work.w13[0], work.w2[0], tw[0], ids[0])
            base = {"model": shape.name, "tokens": t, "pairs": t * shape.top_k,
                    "routed_bytes": nbytes}
            default = choose_config(t, shape.top_k, shape.hidden, shape.inter, dtype, device)
            paths = {"grouped": (grouped_moe, None),
                     "decode": (lambda *a, c=default: decode_moe(*a, config=c), default)}
            for name, (fn, cfg) in paths.items():
                err, us = work.measure(fn, xs, tw, ids, ref)
                rows.append({**base, "path": name, "us": us, "GBps": nbytes / us / 1e3,
                             "fraction_of_copy": nbytes / (us * 1e-6) / copy, "rel_err": err,
                             "config": asdict(cfg) if cfg else None,
                             "fused_moe_takes": name == ("decode" if t * shape.top_k
                                                         <= MAX_DECODE_PAIRS else "grouped")})
            if t in sweep_tokens:
                cases.append((work, t, (xs, tw, ids), ref, base, default))
    sweep: list[dict] = []
    # every model's first sweep token before any model's second: the budget cuts the least
    for work, t, (xs, tw, ids), ref, base, default in sorted(cases, key=lambda c: c[1]):
        for cfg in neighbours(default):
            if time.perf_counter() - began > budget_s:
                sweep.append({**base, "config": asdict(cfg), "skipped": "time budget"})
                continue
            try:
                err, us = work.measure(lambda *a, c=cfg: decode_moe(*a, config=c),
                                       xs, tw, ids, ref)
            except Exception as e:  # a shape the compiler rejects is a row, not a crash
                sweep.append({**base, "config": asdict(cfg), "error": str(e)[:200]})
                continue
            sweep.append({**base, "config": asdict(cfg), "us": us, "rel_err": err,
                          "fraction_of_copy": base["routed_bytes"] / (us * 1e-6) / copy,
                          "default": cfg == default})
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "dtype": str(dtype), "layers_per_graph": layers, "copy_bandwidth_Bps": copy,
            "max_decode_pairs": MAX_DECODE_PAIRS, "seconds": time.perf_counter() - began,
            "rows": rows, "sweep": sweep}


def table(report: dict) -> str:
    """One line per model and token count: both paths side by side."""
    lines = [f"{report['device']}: copy {report['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, "
             f"decode path up to {report['max_decode_pairs']} pairs"]
    paired: dict[tuple[str, int], dict[str, dict]] = {}
    for r in report["rows"]:
        paired.setdefault((r["model"], r["tokens"]), {})[r["path"]] = r
    for (model, t), p in paired.items():
        g, d = p["grouped"], p["decode"]
        err = max(g["rel_err"], d["rel_err"])
        lines.append(f"{model:17s} T={t:2d} {g['routed_bytes'] / 1e6:7.1f} MB  grouped "
                     f"{g['us']:8.1f} us ({g['fraction_of_copy']:5.1%})  decode {d['us']:8.1f} "
                     f"us ({d['fraction_of_copy']:5.1%})  err {err:.1e}")
    timed = [s for s in report["sweep"] if "us" in s]
    for key in dict.fromkeys((s["model"], s["tokens"]) for s in timed):
        best = min((s for s in timed if (s["model"], s["tokens"]) == key), key=lambda s: s["us"])
        lines.append(f"best decode shape {key[0]} T={key[1]}: {best['us']:.1f} us "
                     f"({best['fraction_of_copy']:.1%}) {best['config']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="moe_decode.json")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny shape on CPU through the Triton interpreter (checks the script)")
    a = ap.parse_args()
    if a.smoke:
        report = run([SMOKE_MODEL], (2,), (2,), 2, torch.device("cpu"), 1 << 20, BUDGET_S,
                     lambda default: sweep_configs(default)[:2])
    elif not torch.cuda.is_available():
        print("moe_decode_sweep: needs a CUDA GPU (--smoke checks the script on CPU); skipped")
        return 0
    else:
        report = run(MODELS, TOKENS, SWEEP_TOKENS, LAYERS, torch.device("cuda"), 1 << 30,
                     BUDGET_S)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
