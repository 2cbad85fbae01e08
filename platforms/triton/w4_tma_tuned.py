"""Which one-row 4-bit GEMV a layer takes on a device: the TMA-pipelined kernel
(:mod:`.w4a16_gemv_tma`) at a measured configuration, or the register-tile kernel
(:mod:`.w4a16_gemv`) at its launch rule. Kept as data per device and weight shape.

``benchmarks/w4_tma_sweep.py --install`` times both kernels on a GPU at Llama-3.1-8B's four
layer shapes and writes ``w4_tma_tuned/<device name>.json`` (the name with every character
but letters and digits replaced by ``_``: ``NVIDIA_H200.json``) with the shapes where the
TMA kernel's best configuration beat the register-tile kernel by at least
:data:`MIN_GAIN`::

    {"device": "NVIDIA H200", "date": ..., "commit": ..., "command": ..., "source": ...,
     "shapes": {"N=4096 K=14336 group=128":
                {"config": [32, 256, 8, 4], "prefetch_l2": false, "us": 12.77,
                 "reg_tile_us": 16.07}}}

``config`` is ``(block_n, block_kw, num_warps, num_stages)``. A shape, group or device
without an entry keeps the register-tile kernel; so does the CPU (the interpreter).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

from heteroserve.platforms.triton.device_info import device_name
from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig, fits

TUNED_DIR = Path(__file__).with_name("w4_tma_tuned")
#: the TMA kernel enters a table only where it was at least this much faster
MIN_GAIN = 0.02


def table_file(name: str) -> Path:
    """The table file of the device called ``name``."""
    return TUNED_DIR / (re.sub(r"[^A-Za-z0-9]", "_", name) + ".json")


def shape_key(n: int, k: int, group: int) -> str:
    """``"N=4096 K=14336 group=128"``: a weight ``[K, N]`` packed in groups of ``group``."""
    return f"N={n} K={k} group={group}"


@functools.lru_cache(maxsize=8)
def load_table(path: Path) -> dict[str, W4TmaConfig]:
    """Shape key -> configuration from one file; empty when the file does not exist.
    Raises ``ValueError`` for an entry whose ``config`` is not four positive ints."""
    if not path.is_file():
        return {}
    table = {}
    for key, entry in json.loads(path.read_text()).get("shapes", {}).items():
        raw = entry.get("config")
        if not (isinstance(raw, list) and len(raw) == 4
                and all(isinstance(v, int) and v > 0 for v in raw)):
            raise ValueError(f"{path}: {key}: config must be four positive ints, got {raw!r}")
        table[key] = W4TmaConfig(*raw, prefetch_l2=bool(entry.get("prefetch_l2", False)))
    return table


@functools.lru_cache(maxsize=256)
def tuned_tma_config(n: int, k: int, group: int, device: torch.device) -> W4TmaConfig | None:
    """The TMA configuration for this shape on ``device``, or None (the register-tile
    kernel): no table entry, the CPU, or a shape :func:`.w4a16_gemv_tma.fits` refuses."""
    if device.type == "cpu":
        return None
    cfg = load_table(table_file(device_name(device))).get(shape_key(n, k, group))
    if cfg is None or not fits(n, k, group, cfg.block_kw):
        return None
    return cfg


def describe(device: torch.device) -> str:
    """The start-up words for the one-row 4-bit GEMV on ``device``."""
    if device.type == "cpu":
        return "register-tile GEMV (interpreter tiles)"
    name = device_name(device)
    shapes = load_table(table_file(name))
    if not shapes:
        return f"register-tile GEMV (no w4_tma_tuned/{table_file(name).name})"
    return (f"TMA-pipelined GEMV at {len(shapes)} tuned shape(s) "
            f"(w4_tma_tuned/{table_file(name).name}), register-tile GEMV elsewhere")
