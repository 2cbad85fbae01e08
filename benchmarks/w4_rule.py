"""Launch rules for the one-row 4-bit GEMV (``platforms/triton/w4a16_gemv.py``), for
side-by-side runs: ``python3 benchmarks/w4_rule.py RULE [bench_quant_llama8b.py options]`` runs
``bench_quant_llama8b.py`` with the GEMV under ``RULE`` and records it as ``w4_rule`` in
``quant_llama8b.json``.

Rules:

- ``default``: the W4A16 linears as they stand: the kernel and launch shape the device's
  ``platforms/triton/w4_gemv_tuned`` table names for a shape, else the register-tile GEMV at
  :func:`~heteroserve.platforms.triton.w4a16_gemv.choose_w4_config` (16 KiB tiles of four
  warps: a thread holds 8 columns of 4 word rows).
- ``reg_tile``: the register-tile GEMV at its rule at every shape (the table ignored); every
  rule below but ``tma``, ``tma_pf`` and ``tma_only`` also ignores the table.
- ``tiles32k``: the same columns a program and warps with twice the word rows a step (32 KiB
  tiles, 8 word rows a thread), where that still divides ``K / 8``. The H100 sweep of
  2026-12-06 (``results/h100-20261206-1619-quant_gemv_w4_sweep.txt``) timed this shape
  fastest at Llama-3.1-8B's ``qkv_proj`` and ``o_proj`` (7.1 / 4.9 us against 7.9 / 6.1 at
  the default), in isolation; not yet run end to end.
- ``prefetch``: the default shapes with the next tile's loads issued before a tile's products
  (only layers of two or more tiles a program change).
- ``prefetch_32k``: ``tiles32k`` where that makes a program's whole slice one tile (all of its
  loads before the PDL wait; Llama-3.1-8B's ``qkv_proj`` and ``o_proj``), else ``prefetch``
  (a 32 KiB tile held twice takes about 250 registers a thread).
- ``prefetch_half``: ``prefetch`` with the tile and its warps halved, down to one warp, until
  a program walks at least four tiles.
- ``whole32k``: ``tiles32k`` only where that makes a program's whole slice one tile (all of
  its weight loads issued before the PDL wait, none left for after), else the default; no
  prefetch anywhere, so no layer takes the prefetching loop's registers.
- ``whole32k_down8``: ``whole32k``, and a layer whose programs walk more than four default
  tiles (Llama-3.1-8B's ``down_proj``) takes 8 columns of 512 word rows on 8 warps, the H100
  sweep's fastest shape there (14.7 against 16.4 us), twice as many programs.
- ``tma``: the layers go through the TMA-pipelined GEMV (``w4a16_gemv_tma.py``) instead,
  each at the fastest configuration ``benchmarks/w4_tma_sweep.py`` timed for its shape in
  the JSON named by ``W4_TMA_TABLE`` (16 columns, 16 KiB tiles, 4 warps, 3 stages where
  there is none); a layer the TMA kernel cannot take keeps the register-tile kernel.
- ``tma_pf``: the device's table with ``prefetch_l2`` on at its TMA entries: before the PDL
  wait each program asks the L2 for its first tiles' word rows.
- ``tma_only``: the device's table without its register-tile entries.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from heteroserve.platforms.triton import w4a16_gemv
from heteroserve.platforms.triton.w4a16_gemv import W4GemvConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import rule_named  # noqa: E402

_DEFAULT = w4a16_gemv.choose_w4_config


def _tiles32k(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    cfg = _DEFAULT(n, k, rows, device)
    if device.type == "cpu" or (k // 8) % (2 * cfg.block_kw):
        return cfg
    return replace(cfg, block_kw=2 * cfg.block_kw)


def _prefetch(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    return replace(_DEFAULT(n, k, rows, device), prefetch=True)


def _prefetch_half(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    cfg = _prefetch(n, k, rows, device)
    while (k // 8) // cfg.block_kw < 4 and cfg.num_warps > 1:
        cfg = replace(cfg, block_kw=cfg.block_kw // 2, num_warps=cfg.num_warps // 2)
    return cfg


def _one_tile(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig | None:
    """``tiles32k`` where that makes a program's whole slice one tile, else None."""
    whole = _tiles32k(n, k, rows, device)
    return whole if whole.block_kw >= k // 8 else None


def _prefetch_32k(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    return _one_tile(n, k, rows, device) or _prefetch(n, k, rows, device)


def _whole32k(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    return _one_tile(n, k, rows, device) or _DEFAULT(n, k, rows, device)


def _whole32k_down8(n: int, k: int, rows: int, device: torch.device) -> W4GemvConfig:
    cfg = _whole32k(n, k, rows, device)
    if device.type == "cpu" or (k // 8) // cfg.block_kw <= 4:
        return cfg
    return replace(cfg, block_n=8, block_kw=512, num_warps=8)


RULES = {"reg_tile": _DEFAULT, "tiles32k": _tiles32k, "prefetch": _prefetch,
         "prefetch_half": _prefetch_half, "prefetch_32k": _prefetch_32k,
         "whole32k": _whole32k, "whole32k_down8": _whole32k_down8}


def tma_table(path: str | None) -> dict[tuple[int, int], object]:
    """``(N, K) -> W4TmaConfig`` from the ``tma_best`` rows of a ``w4_tma_sweep.py`` JSON
    (empty without a path or a file there)."""
    import json

    from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig

    if not path or not Path(path).is_file():
        return {}
    rows = json.loads(Path(path).read_text())["rows"]
    return {(r["N"], r["K"]): W4TmaConfig(**r["config"]) for r in rows
            if r.get("path") == "tma_best"}


def _set_tma_lookup(lookup) -> None:
    """Replace the linears' table lookup (``(n, k, group, device) -> config | None``)."""
    from heteroserve.platforms.triton import linear_w4a16

    linear_w4a16.tuned_gemv_config = lookup


def _install_tma() -> None:
    import os

    from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig, fits

    table = tma_table(os.environ.get("W4_TMA_TABLE"))
    fallback = W4TmaConfig(16, 256, 4, 3)

    def lookup(n: int, k: int, group: int, device: torch.device):
        cfg = table.get((n, k), fallback)
        return None if device.type == "cpu" or not fits(n, k, group, cfg.block_kw) else cfg

    _set_tma_lookup(lookup)


def _install_table_variant(rule: str) -> None:
    """``tma_pf`` / ``tma_only``: the device's table with each TMA entry's ``prefetch_l2`` on /
    without its register-tile entries."""
    from heteroserve.platforms.triton.w4_gemv_tuned import tuned_gemv_config
    from heteroserve.platforms.triton.w4a16_gemv_tma import W4TmaConfig

    def lookup(n: int, k: int, group: int, device: torch.device):
        cfg = tuned_gemv_config(n, k, group, device)
        if not isinstance(cfg, W4TmaConfig):
            return None if rule == "tma_only" else cfg
        return replace(cfg, prefetch_l2=True) if rule == "tma_pf" else cfg

    _set_tma_lookup(lookup)


def apply(rule: str) -> None:
    """Install ``rule`` in this process. Raises ``SystemExit`` for an unknown rule."""
    if rule == "tma":
        _install_tma()
    elif rule in ("tma_pf", "tma_only"):
        _install_table_variant(rule)
    elif rule != "default":
        w4a16_gemv.choose_w4_config = rule_named("w4_rule", RULES, rule)
        _set_tma_lookup(lambda n, k, group, device: None)


def main() -> int:
    import bench_quant_llama8b

    apply(sys.argv[1])
    return bench_quant_llama8b.main(sys.argv[2:], {"w4_rule": sys.argv[1]})


if __name__ == "__main__":
    raise SystemExit(main())
