"""Cases for the MLA backends: latent KV writes, extend and decode, over dtypes, page sizes,
head counts and two latent shapes (DeepSeek-V2/V3's and a small odd one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from heteroserve.conformance.cases.attention import (
    DECODE_LENS, DEFAULT_PAGE_SIZES, EXTEND_BATCH, LONG_DECODE, LONG_EXTEND,
)
from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels import ops

#: (kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
DEEPSEEK_DIMS = (512, 128, 64, 128)
SMALL_DIMS = (64, 32, 16, 48)
#: a decode batch past the small-batch paths implementations may take (Triton: 8 sequences)
WIDE_DECODE = (1, 3, 17, 64, 130, 5, 9, 33, 2, 70, 11, 40)


@dataclass(frozen=True)
class MLACase(Case):
    """``kind``: ``write_kv``, ``extend`` or ``decode``; ``seqs``: (prefix, new) per
    sequence; ``dims``: (kv_lora_rank, qk_nope, qk_rope, v) head widths."""

    kind: str
    heads: int
    dims: tuple[int, int, int, int]
    page_size: int
    seqs: tuple[tuple[int, int], ...]

    def request_fields(self) -> dict[str, Any]:
        return dict(page_size=self.page_size, num_q_heads=self.heads,
                    kv_lora_rank=self.dims[0], qk_rope_head_dim=self.dims[2])

    def capability_skip(self, ctx: ConformanceContext) -> str | None:
        return ctx.dtype_skip(self.dtype) or ctx.page_size_skip(self.page_size)


def _case(kind: str, dt: Any, heads: int, dims: tuple[int, int, int, int], page: int,
          long: bool = False, wide: bool = False) -> MLACase:
    c, dn, r, dv = dims
    name = (f"{DTYPE_NAMES[dt]}-p{page}-h{heads}-c{c}-n{dn}-r{r}-v{dv}" + ("-long" if long else "")
            + (f"-b{len(WIDE_DECODE)}" if wide else ""))
    if kind == "decode":
        lens = LONG_DECODE if long else WIDE_DECODE if wide else DECODE_LENS
        seqs = tuple((n - 1, 1) for n in lens)
    else:
        seqs = LONG_EXTEND if long else EXTEND_BATCH
    return MLACase(ops.MLA_ATTENTION, name, dt, kind, heads, dims, page, seqs)


def _grid(ctx: ConformanceContext, kind: str) -> list[MLACase]:
    dtypes = ALL_DTYPES[:2] if ctx.quick else ALL_DTYPES
    pages = ctx.candidate_page_sizes(ops.MLA_ATTENTION, DEFAULT_PAGE_SIZES[:2] if ctx.quick
                                     else DEFAULT_PAGE_SIZES)
    cases = [_case(kind, dt, 16, DEEPSEEK_DIMS, page) for dt in dtypes for page in pages]
    if kind == "write_kv":
        return cases
    cases += [_case(kind, dt, 3, SMALL_DIMS, pages[0]) for dt in dtypes]
    if not ctx.quick:
        cases += [_case(kind, dt, 128, DEEPSEEK_DIMS, pages[-1]) for dt in dtypes]
        cases += [_case(kind, dt, 16, DEEPSEEK_DIMS, pages[-1], long=True) for dt in dtypes]
    if kind == "decode":
        cases += [_case(kind, dt, 16, DEEPSEEK_DIMS, pages[0], wide=True) for dt in dtypes]
    return cases


def mla_cases(kind: str) -> Callable[[ConformanceContext], list[MLACase]]:
    """The case source for one ``kind`` (``write_kv``, ``extend`` or ``decode``)."""
    return lambda ctx: _grid(ctx, kind)
