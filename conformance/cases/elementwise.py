"""Cases for the per-token ops: RMSNorm, fused add + RMSNorm, RMSNorm / add / RMSNorm, gated
activations, rotary."""

from __future__ import annotations

from dataclasses import dataclass

from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels import ops


@dataclass(frozen=True)
class NormCase(Case):
    """``tokens x hidden`` input with values of about ``amplitude``; ``amplitude=256`` makes
    ``x * x`` overflow fp16, catching a norm not computed in fp32."""

    tokens: int
    hidden: int
    eps: float
    amplitude: float


@dataclass(frozen=True)
class ActCase(Case):
    """``tokens x 2*intermediate`` input (``[gate | up]``); ``approximate`` for GELU."""

    tokens: int
    intermediate: int
    approximate: str = "none"


@dataclass(frozen=True)
class RotaryCase(Case):
    """q/k of ``tokens x heads x head_size``; the first ``rotary_dim`` dims rotate, neox or
    GPT-J style, at random positions below ``max_position`` (position 0 included)."""

    tokens: int
    q_heads: int
    kv_heads: int
    head_size: int
    rotary_dim: int
    is_neox: bool
    max_position: int = 4096


def _norm_cases(ctx: ConformanceContext, op: str) -> list[NormCase]:
    shapes = [(1, 128, 1.0), (7, 1000, 1.0), (5, 512, 256.0)]
    if not ctx.quick:
        shapes += [(33, 4096, 1.0)]
    return [NormCase(op, f"{DTYPE_NAMES[dt]}-T{t}-H{h}" + ("-large" if amp > 1 else ""),
                     dt, t, h, 1e-6 if h % 2 == 0 else 1e-5, amp)
            for dt in ALL_DTYPES for t, h, amp in shapes]


def rms_norm_cases(ctx: ConformanceContext) -> list[NormCase]:
    """Every dtype x (1, 128), (7, 1000), (5, 512) large, (33, 4096)."""
    return _norm_cases(ctx, ops.RMS_NORM)


def fused_add_rms_norm_cases(ctx: ConformanceContext) -> list[NormCase]:
    """The RMSNorm grid, for the fused residual add."""
    return _norm_cases(ctx, ops.FUSED_ADD_RMS_NORM)


def norm_add_norm_cases(ctx: ConformanceContext) -> list[NormCase]:
    """Every dtype x Gemma 3 12B's hidden 3840 (one decode row), small odd widths (7, 100),
    a large-amplitude case (x and residual), and Gemma 3 27B's 5376."""
    shapes = [(1, 3840, 1.0), (3, 7, 1.0), (7, 100, 1.0), (5, 512, 256.0)]
    if not ctx.quick:
        shapes += [(17, 5376, 1.0)]
    return [NormCase(ops.NORM_ADD_NORM, f"{DTYPE_NAMES[dt]}-T{t}-H{h}"
                     + ("-large" if amp > 1 else ""), dt, t, h, 1e-6, amp)
            for dt in ALL_DTYPES for t, h, amp in shapes]


def _act_shapes(ctx: ConformanceContext) -> list[tuple[int, int]]:
    return [(1, 64), (7, 352)] + ([] if ctx.quick else [(33, 1408)])


def silu_and_mul_cases(ctx: ConformanceContext) -> list[ActCase]:
    """Every dtype x tokens 1, 7, 33 with odd-ish intermediate sizes."""
    return [ActCase(ops.SILU_AND_MUL, f"{DTYPE_NAMES[dt]}-T{t}-I{i}", dt, t, i)
            for dt in ALL_DTYPES for t, i in _act_shapes(ctx)]


def gelu_and_mul_cases(ctx: ConformanceContext) -> list[ActCase]:
    """The SiLU grid, with ``approximate`` none and tanh."""
    return [ActCase(ops.GELU_AND_MUL, f"{DTYPE_NAMES[dt]}-T{t}-I{i}-{approx}", dt, t, i, approx)
            for dt in ALL_DTYPES for t, i in _act_shapes(ctx) for approx in ("none", "tanh")]


def rotary_cases(ctx: ConformanceContext) -> list[RotaryCase]:
    """Every dtype x neox / GPT-J, full and partial rotary dims, MHA and GQA, head sizes
    64-256."""
    # (tokens, q heads, kv heads, head size, rotary dim, neox)
    grid = [(7, 8, 2, 128, 128, True), (7, 8, 2, 128, 128, False),
            (5, 4, 4, 128, 64, True), (5, 4, 4, 128, 32, False), (1, 8, 1, 64, 64, True)]
    if not ctx.quick:
        grid += [(33, 16, 2, 256, 256, True), (33, 4, 2, 64, 64, False)]
    cases = []
    for dt in ALL_DTYPES:
        for t, hq, hk, d, r, neox in grid:
            style = ("neox" if neox else "gptj") + ("" if r == d else f"-partial{r}")
            cases.append(RotaryCase(ops.ROTARY, f"{DTYPE_NAMES[dt]}-{style}-T{t}-h{hq}:{hk}-d{d}",
                                    dt, t, hq, hk, d, r, neox))
    return cases
