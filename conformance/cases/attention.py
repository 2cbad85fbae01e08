"""Cases for the paged-attention backends: KV writes, extend (prefill on a cached prefix) and
decode, over dtypes, page sizes, GQA ratios, head sizes, ragged batches and the layer options
(sliding window, logit cap)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels import ops

#: (cached prefix, new tokens) per sequence: lengths 1, odd sizes, page-crossing prefixes
EXTEND_BATCH: tuple[tuple[int, int], ...] = ((0, 1), (0, 17), (5, 3), (33, 30), (1, 1),
                                               (126, 5))
#: KV lengths after a decode step: a one-token sequence, short, odd, longer than a 128 page
DECODE_LENS: tuple[int, ...] = (1, 2, 17, 130)
#: long sequences, past the tile and split sizes of real kernels
LONG_EXTEND: tuple[tuple[int, int], ...] = ((0, 300), (700, 45))
LONG_DECODE: tuple[int, ...] = (1000, 513)
#: whole prompts (no cached prefix) past the length at which a kernel may switch paths
#: (cuda's SDPA extend: 2048 tokens)
PROMPT_EXTEND: tuple[tuple[int, int], ...] = ((0, 2100), (0, 2050))
#: a long chunk on a cached prefix next to a whole prompt, both past that length (cuda's SDPA
#: extend attends the prefix and the chunk separately and merges them)
CHUNK_EXTEND: tuple[tuple[int, int], ...] = ((2500, 2100), (0, 2050))
#: a long chunk on a prefix of 20k+ tokens, not a multiple of 4096, next to a whole prompt
#: (cuda's SDPA extend splits the prefix at a multiple of 4096 and joins the rest to the
#: chunk's causal call, in padded shapes)
LONG_CHUNK_EXTEND: tuple[tuple[int, int], ...] = ((16384 + 4096 + 700, 2100), (0, 2050))
DEFAULT_PAGE_SIZES: tuple[int, ...] = (1, 16, 128)


@dataclass(frozen=True)
class AttnCase(Case):
    """``kind``: ``write_kv``, ``extend`` or ``decode``; ``seqs``: (prefix, new) per sequence."""

    kind: str
    q_heads: int
    kv_heads: int
    head_size: int
    page_size: int
    seqs: tuple[tuple[int, int], ...]
    sliding_window: int | None = None
    logit_cap: float | None = None
    kv_fp8: bool = False  # caches in the platform's fp8 flavour (--kv-cache-dtype fp8_e4m3)

    def request_fields(self) -> dict[str, Any]:
        return dict(head_size=self.head_size, num_q_heads=self.q_heads,
                    num_kv_heads=self.kv_heads, page_size=self.page_size,
                    sliding_window=self.sliding_window is not None,
                    logit_cap=self.logit_cap is not None,
                    kv_cache_dtype="fp8_e4m3" if self.kv_fp8 else "auto")

    def capability_skip(self, ctx: ConformanceContext) -> str | None:
        if self.kv_fp8 and ctx.capabilities.fp8_flavour is None:
            return f"platform {ctx.name} declares no fp8 flavour"
        return ctx.dtype_skip(self.dtype) or ctx.page_size_skip(self.page_size)


def _seqs(kind: str, long: bool, prompt: str) -> tuple[tuple[int, int], ...]:
    if prompt:
        return {"prompt": PROMPT_EXTEND, "chunk": CHUNK_EXTEND,
                "longchunk": LONG_CHUNK_EXTEND}[prompt]
    if kind == "decode":
        return tuple((n - 1, 1) for n in (LONG_DECODE if long else DECODE_LENS))
    return LONG_EXTEND if long else EXTEND_BATCH


def _case(kind: str, dt: Any, hq: int, hk: int, d: int, page: int,
          sw: int | None = None, cap: float | None = None, long: bool = False,
          kv_fp8: bool = False, prompt: str = "") -> AttnCase:
    """``prompt``: ``prompt``, ``chunk`` or ``longchunk`` for the long-extend batches above,
    else empty."""
    name = f"{DTYPE_NAMES[dt]}-p{page}-h{hq}:{hk}-d{d}"
    name += (f"-sw{sw}" if sw else "") + (f"-cap{cap:g}" if cap else "") + ("-long" if long else "")
    name += ("-kvfp8" if kv_fp8 else "") + (f"-{prompt}" if prompt else "")
    return AttnCase(ops.ATTENTION, name, dt, kind, hq, hk, d, page, _seqs(kind, long, prompt),
                    sw, cap, kv_fp8)


def _grid(ctx: ConformanceContext, kind: str) -> list[AttnCase]:
    dtypes = ALL_DTYPES[:2] if ctx.quick else ALL_DTYPES
    pages = ctx.candidate_page_sizes(ops.ATTENTION, DEFAULT_PAGE_SIZES[:2] if ctx.quick
                                     else DEFAULT_PAGE_SIZES)
    # each implementation's preferred page size, so one restricted to, say, 128 still runs
    # the head-size and option grids
    base_pages = list(dict.fromkeys(
        [(ctx.capabilities.kv_page_sizes or (16,))[0]]
        + [s.page_sizes[0] for s in ctx.specs(ops.ATTENTION) if s.page_sizes]))
    cases = [_case(kind, dt, 8, 2, 128, page) for dt in dtypes for page in pages]
    cases += [_case(kind, dt, 8, 2, 128, page, kv_fp8=True) for dt in dtypes[:2]
              for page in base_pages]
    if kind == "write_kv":
        return cases
    ratios, sizes = ((1, 8), (64, 128)) if ctx.quick else ((1, 2, 4, 8), (64, 128, 256))
    for page in base_pages:
        for dt in dtypes:
            cases += [_case(kind, dt, 2 * r, 2, d, page) for r in ratios for d in sizes
                      if (r, d) != (4, 128) or page not in pages]  # else in the base grid
        for dt in dtypes:
            cases += [_case(kind, dt, 4, 1, 64, page, sw=8),
                      _case(kind, dt, 4, 1, 64, page, cap=2.0)]
            if not ctx.quick:
                cases += [_case(kind, dt, 8, 2, 128, page, sw=16, cap=5.0),
                          _case(kind, dt, 8, 1, 128, page, long=True),
                          _case(kind, dt, 8, 1, 128, page, sw=100, long=True)]
        if kind == "extend" and not ctx.quick:
            cases += [_case(kind, dt, 8, 2, 128, page, prompt=p) for dt in dtypes
                      if dt is not torch.float32 for p in ("prompt", "chunk")]
            cases += [_case(kind, torch.bfloat16, 2, 1, 128, page, prompt="longchunk")]
    return cases


def attention_cases(kind: str) -> Callable[[ConformanceContext], list[AttnCase]]:
    """The case source for one ``kind`` (``write_kv``, ``extend`` or ``decode``)."""
    return lambda ctx: _grid(ctx, kind)
