"""Cases for every linear scheme (``linear.<scheme>``): shapes, group sizes, act-order and bias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from heteroserve.conformance.context import ALL_DTYPES, DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels.ops import linear_op

FP8_SCHEMES = ("fp8_per_tensor", "fp8_per_channel", "fp8_block")


@dataclass(frozen=True)
class LinearCase(Case):
    """``tokens x in_features`` activations through an ``out_features x in_features`` layer."""

    scheme: str
    tokens: int
    in_features: int
    out_features: int
    group_size: int = 128
    has_g_idx: bool = False
    bias: bool = False

    def request_fields(self) -> dict[str, Any]:
        return {"quant_scheme": self.scheme}

    def capability_skip(self, ctx: ConformanceContext) -> str | None:
        if self.scheme in FP8_SCHEMES and ctx.capabilities.fp8_flavour is None:
            return f"platform {ctx.name} declares no fp8 flavour"
        return ctx.dtype_skip(self.dtype)


#: scheme -> (tokens, K, N, group size, g_idx, bias)
_GRID: dict[str, list[tuple[int, int, int, int, bool, bool]]] = {
    "unquantized": [(1, 256, 128, 128, False, False), (7, 320, 200, 128, False, True),
                    (33, 512, 256, 128, False, False), (1, 1000, 200, 128, False, True)],
    "fp8_per_tensor": [(1, 256, 128, 128, False, False), (7, 256, 256, 128, False, True),
                       (1100, 256, 256, 128, False, False)],
    "fp8_per_channel": [(1, 256, 128, 128, False, False), (7, 256, 256, 128, False, True),
                        (200, 512, 256, 128, False, True)],
    "fp8_block": [(1, 256, 256, 128, False, False), (7, 320, 192, 128, False, True),
                  (200, 512, 256, 128, False, True), (600, 512, 320, 128, False, True)],
    "int8_w8a8": [(1, 256, 128, 128, False, False), (7, 256, 256, 128, False, True)],
    "awq_w4a16": [(1, 256, 128, 128, False, False), (7, 256, 256, 64, False, True),
                  (200, 256, 256, 128, False, True)],
    "gptq_w4a16": [(1, 256, 128, 128, False, False), (7, 256, 256, 64, True, True),
                   (200, 512, 256, 128, True, False)],
}


#: the shapes of a scheme a plugin defines (``LinearSchemeSpec``)
PLUGIN_GRID: list[tuple[int, int, int, int, bool, bool]] = [
    (1, 256, 128, 128, False, False), (7, 320, 200, 128, False, True)]


def linear_cases(ctx: ConformanceContext) -> list[LinearCase]:
    """Every scheme of ``LINEAR_SCHEMES`` x every dtype x the scheme's shapes (ragged fp8
    blocks, W4A16 group sizes 64 and 128, GPTQ act-order, with and without bias; one row, a
    few, and fp8 and W4A16 batches large enough for a library GEMM path; an fp8-block batch
    of 600 rows over a ragged last block of outputs, for paths that start at 512 rows), then every
    scheme a plugin defines (:data:`PLUGIN_GRID`)."""
    cases = []
    grids = {**_GRID, **{name: PLUGIN_GRID for name in sorted(ctx.catalog.linear_schemes)}}
    for scheme, grid in grids.items():
        for dt in ALL_DTYPES:
            for t, k, n, g, gidx, bias in (grid[:1] if ctx.quick else grid):
                name = f"{DTYPE_NAMES[dt]}-T{t}-K{k}-N{n}"
                if scheme.endswith("w4a16"):
                    name += f"-G{g}" + ("-gidx" if gidx else "")
                name += "-bias" if bias else ""
                cases.append(LinearCase(linear_op(scheme), name, dt, scheme, t, k, n, g, gidx,
                                        bias))
    return cases
