"""Cases for MoE routing (top-k softmax, grouped top-k) and the fused expert MLP."""

from __future__ import annotations

from dataclasses import dataclass

from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels import ops
from heteroserve.core.platform import Fp8Flavour


@dataclass(frozen=True)
class TopKCase(Case):
    """``ties``: some rows repeat logits exactly, exercising "ties: lower expert id first";
    ``shared``: shared-expert slots asked of the op (``ops.MOE_SHARED_SLOTS_ATTR``)."""

    tokens: int
    experts: int
    top_k: int
    renormalize: bool
    ties: bool = False
    shared: int = 0


@dataclass(frozen=True)
class GroupedTopKCase(Case):
    """DeepSeek-style routing options (see ``ops.GroupedTopKOp``); ``bias``: a random
    ``correction_bias``; ``shared``: shared-expert slots asked of the op."""

    tokens: int
    experts: int
    groups: int
    topk_group: int
    top_k: int
    scoring: str
    bias: bool
    renormalize: bool
    scaling: float
    shared: int = 0


@dataclass(frozen=True)
class FusedMoECase(Case):
    """``tokens`` routed to ``top_k`` of ``experts`` SiLU-and-mul experts; ``weights``:
    ``dense`` (the model dtype) or an expert weight scheme of ``ops.MOE_WEIGHT_SCHEMES``
    (``fp8_block``: float8_e4m3fn values with 128x128 block scales; ``w4a16``: 4-bit values
    with a scale and zero point per ``group`` inputs; both weight-only)."""

    tokens: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    weights: str = "dense"
    group: int = 0

    def capability_skip(self, ctx: ConformanceContext) -> str | None:
        if self.weights == "fp8_block" and ctx.capabilities.fp8_flavour is not Fp8Flavour.E4M3FN:
            return (f"platform {ctx.name} declares fp8 flavour "
                    f"{ctx.capabilities.fp8_flavour and ctx.capabilities.fp8_flavour.value}: "
                    "the MoE layer passes fp8_block experts (float8_e4m3fn) only where it is "
                    "e4m3fn")
        return ctx.dtype_skip(self.dtype)


def topk_softmax_cases(ctx: ConformanceContext) -> list[TopKCase]:
    """Every dtype x expert counts 8-64, k 1-8, with and without renormalisation and ties;
    DeepSeek-V2-Lite's routing (64 experts, k 6, two shared slots) and an odd slot count."""
    grid = [(1, 8, 2, True, False, 0), (7, 64, 8, False, False, 0), (9, 8, 2, False, True, 0),
            (3, 64, 6, False, False, 2)]
    if not ctx.quick:
        grid += [(33, 60, 4, True, False, 0), (5, 16, 1, False, True, 0),
                 (17, 16, 3, True, True, 3)]
    return [TopKCase(ops.MOE_TOPK_SOFTMAX,
                     f"{DTYPE_NAMES[dt]}-T{t}-E{e}-k{k}" + ("-renorm" if rn else "")
                     + ("-ties" if ties else "") + (f"-shared{n}" if n else ""),
                     dt, t, e, k, rn, ties, n)
            for dt in ALL_DTYPES for t, e, k, rn, ties, n in grid]


def grouped_topk_cases(ctx: ConformanceContext) -> list[GroupedTopKCase]:
    """Every dtype x softmax and sigmoid+bias scoring, group layouts, scaling factors, and
    shared-expert slots after a scaled choice (V3's one shared expert)."""
    # (tokens, experts, groups, topk_group, k, scoring, bias, renormalize, scaling, shared)
    grid = [(5, 16, 4, 2, 4, "softmax", False, True, 1.0, 0),
            (7, 64, 8, 4, 6, "sigmoid", True, True, 2.5, 0),
            (4, 32, 4, 2, 4, "sigmoid", True, True, 2.5, 1)]
    if not ctx.quick:
        grid += [(1, 32, 4, 4, 8, "sigmoid", True, False, 1.0, 0),
                 (33, 16, 2, 1, 2, "softmax", False, False, 1.0, 0),
                 (9, 16, 4, 2, 3, "softmax", False, False, 16.0, 2)]
    return [GroupedTopKCase(
        ops.MOE_GROUPED_TOPK, f"{DTYPE_NAMES[dt]}-T{t}-E{e}-g{g}:{tg}-k{k}-{sc}"
        + ("-bias" if b else "") + ("-renorm" if rn else "") + (f"-x{s}" if s != 1 else "")
        + (f"-shared{n}" if n else ""),
        dt, t, e, g, tg, k, sc, b, rn, s, n)
        for dt in ALL_DTYPES for t, e, g, tg, k, sc, b, rn, s, n in grid]


def fused_moe_cases(ctx: ConformanceContext) -> list[FusedMoECase]:
    """Every dtype x 1-40 tokens over 4-128 experts (some experts get no token; several
    tokens share experts). Both sides of 64 (token, expert) pairs, where implementations
    switch from a few-token (decode) kernel to a grouped GEMM (Triton's ``MAX_DECODE_PAIRS``),
    are in the quick grid; the full grid adds exactly 64 pairs over 128 experts (Qwen3-MoE's
    count) and a DeepSeek-like k=6 with widths that are no multiple of a tile."""
    # (tokens, experts, top_k, hidden, intermediate)
    grid = [(1, 4, 2, 128, 64), (6, 8, 2, 128, 96), (40, 8, 2, 128, 64)]
    if not ctx.quick:
        grid += [(33, 8, 3, 256, 128), (8, 128, 8, 256, 96), (3, 64, 6, 200, 88)]
    return [FusedMoECase(ops.FUSED_MOE, f"{DTYPE_NAMES[dt]}-T{t}-E{e}-k{k}-H{h}-I{i}",
                         dt, t, e, k, h, i)
            for dt in ALL_DTYPES for t, e, k, h, i in grid] + fused_moe_fp8_cases(ctx) + \
        fused_moe_w4_cases(ctx)


def fused_moe_fp8_cases(ctx: ConformanceContext) -> list[FusedMoECase]:
    """fp8_block experts (``I`` a multiple of 128, as the MoE layer keeps them), every
    dtype: 6 pairs (few-token kernel; ``H = 200``: ragged last scale block) and 80 pairs
    (grouped GEMM; ``I = 256``: the up half in its own scale rows); the full grid adds
    exactly 64 pairs over 16 experts and a DeepSeek-like k=6."""
    # (tokens, experts, top_k, hidden, intermediate)
    grid = [(3, 8, 2, 200, 128), (40, 8, 2, 128, 256)]
    if not ctx.quick:
        grid += [(8, 16, 8, 256, 128), (33, 64, 6, 384, 128)]
    return [FusedMoECase(ops.FUSED_MOE, f"fp8_block-{DTYPE_NAMES[dt]}-T{t}-E{e}-k{k}-H{h}-I{i}",
                         dt, t, e, k, h, i, "fp8_block")
            for dt in ALL_DTYPES for t, e, k, h, i in grid]


def fused_moe_w4_cases(ctx: ConformanceContext) -> list[FusedMoECase]:
    """w4a16 experts, every dtype: 6 pairs with groups of 32 (few-token kernel) and 80 pairs
    with groups of 64 (grouped GEMM); the full grid adds exactly 64 pairs over 128 experts
    with groups of 32 and a DeepSeek-like k=6 with groups of 16 and a width no tile
    divides."""
    # (tokens, experts, top_k, hidden, intermediate, group)
    grid = [(3, 8, 2, 128, 64, 32), (40, 8, 2, 128, 192, 64)]
    if not ctx.quick:
        grid += [(8, 128, 8, 256, 96, 32), (3, 64, 6, 208, 80, 16)]
    return [FusedMoECase(ops.FUSED_MOE,
                         f"w4a16-g{g}-{DTYPE_NAMES[dt]}-T{t}-E{e}-k{k}-H{h}-I{i}",
                         dt, t, e, k, h, i, "w4a16", g)
            for dt in ALL_DTYPES for t, e, k, h, i, g in grid]


def fused_moe_graph_cases(ctx: ConformanceContext) -> list[FusedMoECase]:
    """The platform's preferred dtype, 2 and 24 tokens over 16 experts with k=4: 8 and 96
    (token, expert) pairs, one on each side of the few-token / grouped switch; dense
    experts, then fp8_block experts (``I = 128``), then w4a16 experts (groups of 32)."""
    dt = ctx.capabilities.dtypes[0]
    return [FusedMoECase(ops.FUSED_MOE, f"{DTYPE_NAMES.get(dt, dt)}-T{t}-E16-k4-H128-I64", dt,
                         t, 16, 4, 128, 64) for t in (2, 24)] + \
        [FusedMoECase(ops.FUSED_MOE, f"fp8_block-{DTYPE_NAMES.get(dt, dt)}-T{t}-E16-k4-H128-I128",
                      dt, t, 16, 4, 128, 128, "fp8_block") for t in (2, 24)] + \
        [FusedMoECase(ops.FUSED_MOE, f"w4a16-g32-{DTYPE_NAMES.get(dt, dt)}-T{t}-E16-k4-H128-I64",
                      dt, t, 16, 4, 128, 64, "w4a16", 32) for t in (2, 24)]
