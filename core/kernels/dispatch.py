"""Resolve the registry into one dispatch table per engine.

The table is a plain object whose attributes are the selected implementations; the hot path
calls them directly. Each op's :class:`Resolution` keeps why the winner won and why every
other candidate was rejected, for ``heteroserve platforms --explain`` and the start-up log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.registry import KernelRegistry, KernelRequest, KernelSpec


class KernelResolutionError(RuntimeError):
    """No implementation can serve an op, or a forced implementation cannot."""


@dataclass(frozen=True)
class Resolution:
    """How one op was resolved: the chosen spec, whether it was forced, and each rejected
    candidate with its reason (a lower-priority candidate that could have served is listed
    with reason ``"lower priority than <winner>"``)."""

    op: str
    chosen: KernelSpec
    forced: bool
    native: bool
    rejected: tuple[tuple[str, str], ...]


@dataclass
class DispatchTable:
    """Selected implementations. Function ops are attributes named after the op; the
    attention backend class is ``attention``; linear methods are in ``linear`` by scheme."""

    request: KernelRequest
    resolutions: dict[str, Resolution]
    attention: type
    rms_norm: ops.RMSNormOp
    fused_add_rms_norm: ops.FusedAddRMSNormOp
    silu_and_mul: ops.SiluAndMulOp
    gelu_and_mul: ops.GeluAndMulOp
    rotary_embedding: ops.RotaryOp
    moe_topk_softmax: ops.TopKSoftmaxOp
    moe_grouped_topk: ops.GroupedTopKOp
    fused_moe: ops.FusedMoEOp
    sampling: ops.SamplingOp
    token_bitmask_apply: ops.TokenBitmaskApplyOp
    linear: dict[str, type] = field(default_factory=dict)

    def summary(self) -> list[tuple[str, str, str]]:
        """``(op, implementation, native|fallback|forced)`` rows, op order."""
        rows = []
        for op, res in sorted(self.resolutions.items()):
            kind = "forced" if res.forced else ("native" if res.native else "fallback")
            rows.append((op, res.chosen.name, kind))
        return rows


def parse_kernel_overrides(items: Iterable[str]) -> dict[str, str]:
    """Parse ``--kernel OP=IMPL`` values. Raises ``ValueError`` on a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        op, sep, impl = item.partition("=")
        if not sep or not op.strip() or not impl.strip():
            raise ValueError(f"--kernel expects OP=IMPL, got {item!r}")
        out[op.strip()] = impl.strip()
    return out


def resolve_op(registry: KernelRegistry, op: str, request: KernelRequest,
               forced: str | None = None) -> Resolution:
    """Pick the implementation of ``op`` for ``request`` (or check the ``forced`` one)."""
    candidates = registry.implementations(op)
    if forced is not None:
        spec = registry.get(op, forced)
        support = spec.check(request)
        if not support.ok:
            raise KernelResolutionError(
                f"--kernel {op}={forced} cannot run here: {support.reason}")
        rejected = tuple((s.name, f"not forced (--kernel {op}={forced})")
                         for s in candidates if s.name != forced)
        return Resolution(op, spec, True, spec.is_native(request.platform), rejected)
    chosen: KernelSpec | None = None
    rejected: list[tuple[str, str]] = []
    for spec in candidates:
        support = spec.check(request)
        if not support.ok:
            rejected.append((spec.name, support.reason))
        elif chosen is None:
            chosen = spec
        else:
            rejected.append((spec.name, f"lower priority than {chosen.name}"))
    if chosen is None:
        why = "; ".join(f"{name}: {reason}" for name, reason in rejected) or "none registered"
        raise KernelResolutionError(
            f"no implementation of {op!r} serves platform={request.platform} "
            f"dtype={request.dtype} ({why})")
    return Resolution(op, chosen, False, chosen.is_native(request.platform), tuple(rejected))


def negotiate_page_size(registry: KernelRegistry, request: KernelRequest,
                        forced: str | None = None) -> int:
    """Choose the KV page size: the requested one if set, else the preferred page size of
    the attention implementation that would win (its first declared page size, then the
    platform's first, then 1)."""
    if request.page_size is not None:
        return request.page_size
    probe = request.with_page_size(0)
    for spec in registry.implementations(ops.ATTENTION):
        if forced is not None and spec.name != forced:
            continue
        if not spec.runs_on(request.platform):
            continue
        backend = spec.load()
        sizes = getattr(backend, "page_sizes", None) or request.platform_page_sizes
        candidate = probe.with_page_size(sizes[0] if sizes else 1)
        if spec.check(candidate).ok:
            return candidate.page_size or 1
    return 1


def resolve_dispatch(registry: KernelRegistry, request: KernelRequest,
                     overrides: Mapping[str, str] | None = None,
                     linear_schemes: Iterable[str] = ("unquantized",)) -> DispatchTable:
    """Resolve every op the engine needs. ``overrides`` maps op name to a forced
    implementation name; an override naming an op nobody asked for is an error."""
    overrides = dict(overrides or {})
    wanted = [ops.ATTENTION, *ops.FUNCTION_OPS, *(ops.linear_op(s) for s in linear_schemes)]
    unknown = sorted(set(overrides) - set(wanted))
    if unknown:
        raise KernelResolutionError(
            f"--kernel names unknown op(s) {', '.join(unknown)}; ops: {', '.join(wanted)}")
    resolutions = {op: resolve_op(registry, op, request, overrides.get(op)) for op in wanted}
    loaded: dict[str, Any] = {op: res.chosen.load() for op, res in resolutions.items()}
    linear = {s: loaded[ops.linear_op(s)] for s in linear_schemes}
    return DispatchTable(
        request=request, resolutions=resolutions, linear=linear,
        **{op: loaded[op] for op in (ops.ATTENTION, *ops.FUNCTION_OPS)})
