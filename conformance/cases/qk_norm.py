"""Cases for the fused per-head q/k RMSNorm + rotary op."""

from __future__ import annotations

from dataclasses import dataclass

from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.cases.elementwise import RotaryCase
from heteroserve.core.kernels import ops


@dataclass(frozen=True)
class QKNormRotaryCase(RotaryCase):
    """A :class:`RotaryCase` whose q/k heads are RMS-normalized first, with values of about
    ``amplitude`` (256 makes ``x * x`` overflow fp16). ``strided``: q and k are views of one
    fused ``[T, (Hq + 2 Hk) * D + pad]`` qkv buffer, as a model's qkv projection gives them."""

    strided: bool = False
    amplitude: float = 1.0
    eps: float = 1e-6


def qk_norm_rotary_cases(ctx: ConformanceContext) -> list[QKNormRotaryCase]:
    """Every dtype x neox / GPT-J, full and partial rotary dims, GQA (Hq != Hk) and MHA,
    strided and contiguous q/k, one large-amplitude case; head sizes 64-256."""
    # (tokens, q heads, kv heads, head size, rotary dim, neox, strided, amplitude)
    grid = [(1, 32, 4, 128, 128, True, True, 1.0), (7, 8, 2, 128, 128, False, True, 1.0),
            (5, 4, 4, 128, 64, True, True, 1.0), (5, 6, 2, 128, 32, False, False, 1.0),
            (3, 8, 1, 64, 64, True, False, 256.0)]
    if not ctx.quick:
        grid += [(33, 16, 2, 256, 256, True, True, 1.0), (17, 5, 1, 80, 48, False, True, 1.0)]
    cases = []
    for dt in ALL_DTYPES:
        for t, hq, hk, d, r, neox, strided, amp in grid:
            name = (f"{DTYPE_NAMES[dt]}-{'neox' if neox else 'gptj'}"
                    + ("" if r == d else f"-partial{r}") + f"-T{t}-h{hq}:{hk}-d{d}"
                    + ("-strided" if strided else "") + ("-large" if amp > 1 else ""))
            cases.append(QKNormRotaryCase(ops.QK_NORM_ROTARY, name, dt, t, hq, hk, d, r, neox,
                                          strided=strided, amplitude=amp))
    return cases


def qk_norm_rotary_refused_cases(ctx: ConformanceContext) -> list[QKNormRotaryCase]:
    """Inputs the contract rules out, in the platform's first dtype: a weight of the wrong
    width (the case's ``head_size`` is the weight's; q/k keep 64)."""
    dt = ctx.capabilities.dtypes[0]
    return [QKNormRotaryCase(ops.QK_NORM_ROTARY, f"{DTYPE_NAMES.get(dt, dt)}-weight-width", dt,
                             3, 4, 2, 65, 64, True, strided=True)]


def qk_norm_rotary_graph_cases(ctx: ConformanceContext) -> list[QKNormRotaryCase]:
    """A batch-4 decode shape (Qwen3-MoE's heads) in the platform's first dtype."""
    dt = ctx.capabilities.dtypes[0]
    return [QKNormRotaryCase(ops.QK_NORM_ROTARY, f"{DTYPE_NAMES.get(dt, dt)}-T4-h32:4-d128", dt,
                             4, 32, 4, 128, 128, True, strided=True)]
