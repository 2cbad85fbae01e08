"""Which one-row 4-bit GEMV a layer takes on a device, and at which launch shape: the
TMA-pipelined kernel (:mod:`.w4a16_gemv_tma`) or the register-tile kernel
(:mod:`.w4a16_gemv`) at a measured configuration, kept as data per device and weight shape;
the register-tile kernel at its launch rule where the table is silent.

``benchmarks/w4_tma_sweep.py --install`` (or ``--table-from`` earlier sweeps' JSON) writes
``w4_gemv_tuned/<device name>.json`` (the name with every character but letters and digits
replaced by ``_``: ``NVIDIA_H200.json``) with the shapes where a swept configuration beat the
register-tile kernel's launch rule by at least :data:`MIN_GAIN`::

    {"device": "NVIDIA H200", "date": ..., "command": ..., "sources": [...],
     "shapes": {"N=4096 K=14336 group=128":
                {"kernel": "tma", "config": [32, 256, 8, 4], "prefetch_l2": false,
                 "us": 12.77, "rule_us": 16.07},
                "N=4096 K=4096 group=128":
                {"kernel": "reg_tile", "config": [8, 512, 2, 1], "prefetch": false,
                 "us": 4.75, "rule_us": 5.90}}}

``config`` is ``(block_n, block_kw, num_warps, num_stages)``. The nibble decoding is not
stored: the caller takes the device's (:func:`.w4a16_gemv.nibble_decoding`). The CPU (the
interpreter) never takes a table.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from heteroserve.platforms.triton.device_info import device_name, table_stem
from heteroserve.platforms.triton.w4a16_gemv import W4GemvConfig
from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig, fits

TUNED_DIR = Path(__file__).with_name("w4_gemv_tuned")
#: a configuration enters a table only where it was at least this much faster than the rule
MIN_GAIN = 0.02
KERNELS = ("tma", "reg_tile")

TunedConfig = W4TmaConfig | W4GemvConfig


def table_file(name: str) -> Path:
    """The table file of the device called ``name``."""
    return TUNED_DIR / (table_stem(name) + ".json")


def shape_key(n: int, k: int, group: int) -> str:
    """``"N=4096 K=14336 group=128"``: a weight ``[K, N]`` packed in groups of ``group``."""
    return f"N={n} K={k} group={group}"


def _entry(path: Path, key: str, entry: dict) -> TunedConfig:
    raw, kernel = entry.get("config"), entry.get("kernel")
    if kernel not in KERNELS:
        raise ValueError(f"{path}: {key}: kernel must be one of {KERNELS}, got {kernel!r}")
    if not (isinstance(raw, list) and len(raw) == 4
            and all(isinstance(v, int) and v > 0 for v in raw)):
        raise ValueError(f"{path}: {key}: config must be four positive ints, got {raw!r}")
    if kernel == "tma":
        return W4TmaConfig(*raw, prefetch_l2=bool(entry.get("prefetch_l2", False)))
    return W4GemvConfig(*raw, prefetch=bool(entry.get("prefetch", False)))


@functools.lru_cache(maxsize=8)
def load_table(path: Path) -> dict[str, TunedConfig]:
    """Shape key -> configuration from one file; empty when the file does not exist.
    Raises ``ValueError`` naming the entry whose ``kernel`` or ``config`` is malformed."""
    if not path.is_file():
        return {}
    shapes = json.loads(path.read_text()).get("shapes", {})
    return {key: _entry(path, key, entry) for key, entry in shapes.items()}


@functools.lru_cache(maxsize=256)
def tuned_gemv_config(n: int, k: int, group: int, device: torch.device) -> TunedConfig | None:
    """The configuration for this shape on ``device`` (its type says the kernel), or None
    (the register-tile kernel at its launch rule): no table entry, the CPU, or a TMA entry
    :func:`.w4a16_gemv_tma.fits` refuses."""
    if device.type == "cpu":
        return None
    cfg = load_table(table_file(device_name(device))).get(shape_key(n, k, group))
    if isinstance(cfg, W4TmaConfig) and not fits(n, k, group, cfg.block_kw):
        return None
    return cfg

