"""Grouped-GEMM tile configs of fused MoE tuned per device and expert shape, kept as data.

``benchmarks/moe_tune.py`` times every candidate tile of the two grouped GEMMs
(:mod:`.moe_gemm`) on a GPU at one expert shape and a range of pair counts, and writes the
fastest per count to ``moe_tuned/<device name>.json`` (the name with every character but
letters and digits replaced by ``_``: ``NVIDIA_H200.json``)::

    {"device": "NVIDIA H200", "date": ..., "commit": ..., "command": ...,
     "tables": {"bfloat16 E=128 H=2048 I=768":
                {"2048": {"gate_up": [16, 128, 128, 4, 3], "down": [16, 64, 128, 4, 3],
                          "us": ..., "default_us": ...}, ...}}}

Each config is ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``; the two of one entry
share ``BLOCK_M``. :func:`tuned_configs` returns the entry whose pair count is nearest (in
log scale) to the call's, or None where the device or shape has no table (the caller then
uses the heuristic in :func:`~.moe_gemm.moe_configs`).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from heteroserve.platforms.triton.device_info import device_name, table_stem
from heteroserve.platforms.triton.moe_gemm import Config

TUNED_DIR = Path(__file__).with_name("moe_tuned")


def table_file(name: str) -> Path:
    """The table file of the device called ``name``."""
    return TUNED_DIR / (table_stem(name) + ".json")


def shape_key(dtype: torch.dtype, num_experts: int, hidden: int, inter: int) -> str:
    """``"bfloat16 E=128 H=2048 I=768"``: the weights' dtype and ``w13 [E, 2I, H]``."""
    return f"{str(dtype).removeprefix('torch.')} E={num_experts} H={hidden} I={inter}"


def _config(raw: object) -> Config:
    if not (isinstance(raw, list) and len(raw) == 5 and all(isinstance(v, int) for v in raw)):
        raise ValueError(f"a tile config is five ints, got {raw!r}")
    return tuple(raw)  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def load_table(path: Path) -> dict[str, list[tuple[int, Config, Config]]]:
    """The tables of one file: shape key -> ``[(pairs, gate_up, down)]`` sorted by pairs;
    empty when the file does not exist. Raises ``ValueError`` for a malformed file or an
    entry whose two configs differ in ``BLOCK_M``."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    tables: dict[str, list[tuple[int, Config, Config]]] = {}
    for key, rows in data.get("tables", {}).items():
        entries = []
        for pairs, row in rows.items():
            gate_up, down = _config(row["gate_up"]), _config(row["down"])
            if gate_up[0] != down[0]:
                raise ValueError(f"{path}: {key} at {pairs} pairs: BLOCK_M {gate_up[0]} != "
                                 f"{down[0]}")
            entries.append((int(pairs), gate_up, down))
        tables[key] = sorted(entries)
    return tables


def nearest(entries: list[tuple[int, Config, Config]], num_pairs: int
            ) -> tuple[Config, Config]:
    """The configs of the entry nearest ``num_pairs`` in log scale (``entries`` non-empty;
    a tie goes to the smaller count)."""
    target = math.log2(max(1, num_pairs))
    best = min(entries, key=lambda e: (abs(math.log2(e[0]) - target), e[0]))
    return best[1], best[2]


@functools.lru_cache(maxsize=64)
def device_entries(device: torch.device, dtype: torch.dtype, num_experts: int, hidden: int,
                   inter: int) -> list[tuple[int, Config, Config]] | None:
    """The table of this expert shape on ``device`` (None: no table, or the CPU), looked up
    once per shape: every grouped MoE call asks."""
    if device.type == "cpu":
        return None
    entries = load_table(table_file(device_name(device))).get(
        shape_key(dtype, num_experts, hidden, inter))
    return entries or None


def tuned_configs(num_pairs: int, dtype: torch.dtype, num_experts: int, hidden: int,
                  inter: int, device: torch.device) -> tuple[Config, Config] | None:
    """The tuned ``(gate_up, down)`` configs for this device and expert shape, or None."""
    entries = device_entries(device, dtype, num_experts, hidden, inter)
    return nearest(entries, num_pairs) if entries else None


def describe(w13: torch.Tensor, w2: torch.Tensor) -> str:
    """The start-up line for experts ``w13 [E, 2I, H]`` (the fused MoE op's
    ``describe_experts``): which tiles the grouped GEMM takes on their device."""
    e, two_i, h = w13.shape
    key = shape_key(w13.dtype, e, h, two_i // 2)
    if w13.device.type == "cpu":
        return f"grouped GEMM tiles: interpreter tiles ({key})"
    name = device_name(w13.device)
    entries = device_entries(w13.device, w13.dtype, e, h, two_i // 2)
    if not entries:
        return (f"grouped GEMM tiles: heuristic (no table for {key} in "
                f"moe_tuned/{table_file(name).name}; benchmarks/moe_tune.py writes one)")
    return (f"grouped GEMM tiles: tuned for {name}, {key}, {len(entries)} pair counts "
            f"{entries[0][0]}-{entries[-1][0]} (moe_tuned/{table_file(name).name})")
