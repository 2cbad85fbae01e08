"""Dispatch resolution: priorities, support reasons, forcing, page-size negotiation."""

from __future__ import annotations

import pytest
import torch

from heteroserve.core.kernels import ops
from heteroserve.core.kernels.dispatch import (
    KernelResolutionError, negotiate_page_size, parse_kernel_overrides, resolve_all, resolve_op,
)
from heteroserve.core.kernels.registry import (
    ANY_PLATFORM, KernelRegistry, KernelRequest, KernelSpec, Support,
)

REQ = KernelRequest(platform="acme", device_type="cpu", dtype=torch.bfloat16, head_size=128)


def _spec(name: str, priority: int, platforms=(ANY_PLATFORM,), supports=None, op="rms_norm",
          page_sizes=None) -> KernelSpec:
    kwargs = {"supports": supports} if supports else {}
    return KernelSpec(op=op, name=name, load=lambda: name, platforms=platforms,
                      priority=priority, page_sizes=page_sizes, **kwargs)


def test_highest_priority_supporting_wins_and_rejections_are_explained() -> None:
    reg = KernelRegistry()
    reg.register(_spec("fallback", -100))
    reg.register(_spec("fast", 10, platforms=("acme",),
                       supports=lambda r: Support.no("no bf16") if r.dtype == torch.bfloat16
                       else Support.yes()))
    reg.register(_spec("other_vendor", 20, platforms=("zeta",)))
    res = resolve_op(reg, "rms_norm", REQ)
    assert res.chosen.name == "fallback" and not res.native
    reasons = dict(res.rejected)
    assert reasons["fast"] == "no bf16"
    assert "runs only on zeta" in reasons["other_vendor"]


def test_forced_implementation_and_its_errors() -> None:
    reg = KernelRegistry()
    reg.register(_spec("a", 1))
    reg.register(_spec("b", 0))
    res = resolve_op(reg, "rms_norm", REQ, forced="b")
    assert res.chosen.name == "b" and res.forced
    with pytest.raises(KeyError, match="known: a, b"):
        resolve_op(reg, "rms_norm", REQ, forced="zzz")
    reg.register(_spec("never", 0, supports=lambda r: Support.no("nope"), op="silu_and_mul"))
    with pytest.raises(KernelResolutionError, match="nope"):
        resolve_op(reg, "silu_and_mul", REQ, forced="never")


def test_no_supporting_implementation_is_an_error_with_reasons() -> None:
    reg = KernelRegistry()
    reg.register(_spec("only", 0, platforms=("zeta",)))
    with pytest.raises(KernelResolutionError, match="runs only on zeta"):
        resolve_op(reg, "rms_norm", REQ)


def test_unknown_override_op_is_rejected() -> None:
    reg = KernelRegistry()
    with pytest.raises(KernelResolutionError, match="unknown op"):
        resolve_all(reg, REQ, {"not_an_op": "x"})


def test_parse_kernel_overrides() -> None:
    assert parse_kernel_overrides(["attention=triton", " rms_norm = torch_native "]) == {
        "attention": "triton", "rms_norm": "torch_native"}
    with pytest.raises(ValueError, match="OP=IMPL"):
        parse_kernel_overrides(["attention"])


def test_page_size_negotiation_follows_winner_and_platform() -> None:
    reg = KernelRegistry()
    reg.register(_spec("paged128", 5, op=ops.ATTENTION, page_sizes=(128,)))
    reg.register(_spec("any", 0, op=ops.ATTENTION))
    assert negotiate_page_size(reg, REQ) == 128
    assert negotiate_page_size(reg, REQ, forced="any") == 16
    limited = KernelRequest(platform="acme", device_type="cpu", dtype=torch.float32,
                            platform_page_sizes=(64, 128))
    assert negotiate_page_size(reg, limited, forced="any") == 64
    assert negotiate_page_size(reg, REQ.with_page_size(32)) == 32
    res = resolve_op(reg, ops.ATTENTION, REQ.with_page_size(32))
    assert res.chosen.name == "any"
    assert "page size 32 not in [128]" in dict(res.rejected)["paged128"]
    with pytest.raises(KernelResolutionError, match="page size 32"):
        resolve_all(reg, KernelRequest(platform="acme", device_type="cpu", dtype=torch.float32,
                                       page_size=32, platform_page_sizes=(128,)))
