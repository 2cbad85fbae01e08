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
    attention backend class is ``attention`` (``mla_attention`` for latent attention); linear methods are in ``linear`` by scheme."""

    request: KernelRequest
    resolutions: dict[str, Resolution]
    attention: type
    mla_attention: type
    rms_norm: ops.RMSNormOp
    fused_add_rms_norm: ops.FusedAddRMSNormOp
    norm_add_norm: ops.NormAddNormOp
    silu_and_mul: ops.SiluAndMulOp
    gelu_and_mul: ops.GeluAndMulOp
    rotary_embedding: ops.RotaryOp
    qk_norm_rotary: ops.QKNormRotaryOp
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
        spec = registry.get(op, forced, request.platform)
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


DEFAULT_PAGE_SIZE = 16


def negotiate_page_size(registry: KernelRegistry, request: KernelRequest,
                        forced: str | None = None) -> int:
    """Choose the KV page size: the requested one if set; else the first page size of the
    attention implementation that would win (its ``KernelSpec.page_sizes``), else the
    platform's first declared page size, else :data:`DEFAULT_PAGE_SIZE`. Imports nothing."""
    if request.page_size is not None:
        return request.page_size
    platform_sizes = request.platform_page_sizes
    for spec in registry.implementations(ops.ATTENTION):
        if forced is not None and spec.name != forced:
            continue
        if not spec.check(request).ok:
            continue
        sizes = [s for s in (spec.page_sizes or platform_sizes or ())
                 if platform_sizes is None or s in platform_sizes]
        if sizes:
            return sizes[0]
        return DEFAULT_PAGE_SIZE
    return platform_sizes[0] if platform_sizes else DEFAULT_PAGE_SIZE


def wanted_ops(linear_schemes: Iterable[str] = ("unquantized",)) -> list[str]:
    """Every op an engine resolves: attention, MLA, the function ops, one linear op per
    scheme."""
    return [ops.ATTENTION, ops.MLA_ATTENTION, *ops.FUNCTION_OPS, *(ops.linear_op(s) for s in linear_schemes)]


def resolve_all(registry: KernelRegistry, request: KernelRequest,
                overrides: Mapping[str, str] | None = None,
                linear_schemes: Iterable[str] = ("unquantized",)) -> dict[str, Resolution]:
    """Resolve every wanted op without loading any implementation. ``overrides`` maps op
    name to a forced implementation name; an override naming an op nobody asked for, or a
    page size the platform does not support, is an error."""
    overrides = dict(overrides or {})
    allowed = request.platform_page_sizes
    if request.page_size is not None and allowed is not None and request.page_size not in allowed:
        raise KernelResolutionError(
            f"page size {request.page_size} is not supported by platform {request.platform} "
            f"(supported: {', '.join(map(str, allowed))})")
    wanted = wanted_ops(linear_schemes)
    unknown = sorted(set(overrides) - set(wanted))
    if unknown:
        raise KernelResolutionError(
            f"--kernel names unknown op(s) {', '.join(unknown)}; ops: {', '.join(wanted)}")
    return {op: resolve_op(registry, op, request, overrides.get(op)) for op in wanted}


def resolve_dispatch(registry: KernelRegistry, request: KernelRequest,
                     overrides: Mapping[str, str] | None = None,
                     linear_schemes: Iterable[str] = ("unquantized",)) -> DispatchTable:
    """Resolve every op the engine needs and load the winners into a dispatch table."""
    linear_schemes = tuple(linear_schemes)
    resolutions = resolve_all(registry, request, overrides, linear_schemes)
    loaded: dict[str, Any] = {op: res.chosen.load() for op, res in resolutions.items()}
    linear = {s: loaded[ops.linear_op(s)] for s in linear_schemes}
    return DispatchTable(
        request=request, resolutions=resolutions, linear=linear,
        **{op: loaded[op] for op in (ops.ATTENTION, ops.MLA_ATTENTION, *ops.FUNCTION_OPS)})
