"""The ``performance`` tier's measurements: the device's copy bandwidth and the effective
bandwidth of a memory-bound op, both timed the same way.

Bandwidth is bytes moved (read + written, each byte once) per second. A run of ``iters``
calls is timed between two :meth:`Platform.synchronize` calls, so launch latency is
amortised, and the best of ``repeats`` runs is kept (the least disturbed one). The copy
bandwidth is that of ``dst.copy_(src)`` over a buffer as large as the ops' inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from heteroserve.conformance.context import DTYPE_NAMES
from heteroserve.conformance.params import Case, ConfParam
from heteroserve.core.kernels import ops

if TYPE_CHECKING:
    from heteroserve.conformance.context import ConformanceContext

#: bytes of one op input tensor (and of the copy buffer): full grid, quick grid
TENSOR_BYTES = 256 * 2**20
QUICK_TENSOR_BYTES = 4 * 2**20
WIDTH = 8192  # hidden size (norms) or 2 x intermediate size (gated activations)


@dataclass(frozen=True)
class PerfCase(Case):
    """``tokens x width`` input of ``op`` (a norm or a gated activation)."""

    tokens: int
    width: int

    def bytes_moved(self) -> int:
        """Bytes the op must read and write, each once."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        plane = self.tokens * self.width * elem
        if self.op == ops.RMS_NORM:  # x, weight in; out
            return 2 * plane + self.width * elem
        if self.op == ops.FUSED_ADD_RMS_NORM:  # x, residual, weight in; out, residual
            return 4 * plane + self.width * elem
        return plane + plane // 2  # [gate | up] in; out of half the width


def perf_cases(ctx: ConformanceContext, op: str) -> list[PerfCase]:
    """One large input of ``op`` in the platform's preferred dtype (bf16 when declared);
    none unless the performance tier was requested."""
    if ctx.performance_fraction is None:
        return []
    declared = ctx.capabilities.dtypes
    dtype = torch.bfloat16 if torch.bfloat16 in declared else declared[0]
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = max(1, tensor_bytes(ctx) // (WIDTH * elem))
    return [PerfCase(op, f"{DTYPE_NAMES.get(dtype, dtype)}-T{tokens}-W{WIDTH}", dtype,
                     tokens, WIDTH)]


@dataclass(frozen=True)
class Timing:
    """``seconds`` per call (best of the repeats) for ``bytes_moved`` per call."""

    seconds: float
    bytes_moved: int

    @property
    def bytes_per_second(self) -> float:
        return self.bytes_moved / self.seconds if self.seconds > 0 else float("inf")


def tensor_bytes(ctx: ConformanceContext) -> int:
    """The size of one input tensor (and of the copy buffer) for this run's grid."""
    return QUICK_TENSOR_BYTES if ctx.quick else TENSOR_BYTES


def time_calls(ctx: ConformanceContext, fn: Callable[[], object], bytes_moved: int,
               iters: int | None = None, repeats: int | None = None, warmup: int = 2
               ) -> Timing:
    """Time ``fn()`` (which moves ``bytes_moved`` bytes) on the platform's device:
    ``repeats`` runs of ``iters`` calls (default 5 x 10, quick grid 3 x 3)."""
    device = ctx.device
    iters = iters or (3 if ctx.quick else 10)
    repeats = repeats or (3 if ctx.quick else 5)
    for _ in range(warmup):
        fn()
    ctx.platform.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        ctx.platform.synchronize(device)
        best = min(best, (time.perf_counter() - start) / iters)
    return Timing(best, bytes_moved)


def copy_bandwidth(ctx: ConformanceContext) -> Timing:
    """The device's measured copy bandwidth (``dst.copy_(src)``, read + write), measured
    once per run and kept on ``ctx``."""
    cached = ctx.measurements.get("copy")
    if isinstance(cached, Timing):
        return cached
    n = tensor_bytes(ctx) // 4
    src = torch.ones(n, dtype=torch.float32, device=ctx.device)
    dst = torch.empty_like(src)
    timing = time_calls(ctx, lambda: dst.copy_(src), 2 * n * 4)
    ctx.measurements["copy"] = timing
    return timing


def check_bandwidth(conf: ConfParam, ctx: ConformanceContext,
                    properties: list[tuple[str, Any]], call: Callable[[], object]) -> None:
    """Time ``call`` (one call of ``conf``'s implementation on ``conf.case``), append the
    measurement to ``properties`` (a test's ``user_properties``, as ``("perf", {...})``)
    and raise ``AssertionError`` when it moves less than ``ctx.performance_fraction`` of
    the copy bandwidth."""
    case = conf.case
    if not isinstance(case, PerfCase) or ctx.performance_fraction is None:
        raise ValueError("check_bandwidth needs a PerfCase and a requested performance tier")
    required = ctx.performance_fraction
    copy = copy_bandwidth(ctx)
    timing = time_calls(ctx, call, case.bytes_moved())
    fraction = timing.bytes_per_second / copy.bytes_per_second
    properties.append(("perf", {
        "op": conf.label, "implementation": conf.impl, "case": case.name,
        "gb_per_s": round(timing.bytes_per_second / 1e9, 3),
        "copy_gb_per_s": round(copy.bytes_per_second / 1e9, 3),
        "fraction": round(fraction, 4), "required": required}))
    assert fraction >= required, (
        f"{conf.label}={conf.impl} moves {timing.bytes_per_second / 1e9:.1f} GB/s, "
        f"{fraction:.2f} of the copy bandwidth {copy.bytes_per_second / 1e9:.1f} GB/s; "
        f"the performance tier asks for {required:.2f}")
