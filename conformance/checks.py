"""How the suite compares an implementation with its oracle.

- :func:`poisoned_allocations`: every tensor allocated without initialisation (``torch.empty``
  and friends, on any device) comes out as NaN (floats) or the largest integer, so an output
  element an implementation forgets to write cannot pass by luck.
- :func:`run_op`: one call under poison (checked against the oracle), then two ordinary calls
  that must agree bitwise (determinism).
- :func:`assert_close`: the tolerance check of :mod:`~heteroserve.conformance.tolerances`,
  recording the error as the test's ``max_rel_err`` property for the report.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from heteroserve.conformance.tolerances import tolerance

#: a finite value no test input comes near; caches are filled with it outside the live slots
SENTINEL = 4096.0


def sentinel(dtype: torch.dtype) -> float:
    """:data:`SENTINEL`, or the largest finite value of a dtype that cannot hold it (fp8)."""
    return min(SENTINEL, float(torch.finfo(dtype).max)) if dtype.is_floating_point else SENTINEL
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within the block, uninitialised allocations are filled with NaN / max-int (torch's
    deterministic mode, warn-only so that no op is refused). Restores the previous mode."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host reinterpreted as integers, so NaNs compare equal to themselves."""
    t = t.detach().contiguous().cpu()
    if t.is_floating_point():
        return t.view(_INT_VIEW[t.element_size()])
    return t


def assert_bitwise_equal(a: Any, b: Any, what: str) -> None:
    """Every tensor of ``a`` equals the matching one of ``b`` bit for bit."""
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb), f"{what}: {len(ta)} vs {len(tb)} tensors"
    for i, (x, y) in enumerate(zip(ta, tb)):
        assert x.shape == y.shape and x.dtype == y.dtype, \
            f"{what}: output {i} is {x.dtype}{list(x.shape)} then {y.dtype}{list(y.shape)}"
        diff = int((bits(x) != bits(y)).sum())
        assert diff == 0, f"{what}: output {i} differs in {diff} of {x.numel()} elements"


def run_op(fn: Callable[..., Any], make_args: Callable[[], tuple], *,
           determinism: bool = True) -> Any:
    """Call ``fn(*make_args())`` under :func:`poisoned_allocations` and return the result,
    which must hold no NaN (no oracle of the suite has one, and unwritten elements are NaN
    under poison); with ``determinism``, call it twice more (fresh arguments, ordinary allocation) and assert
    the two results are bitwise equal. ``make_args`` must build fresh inputs each call."""
    with poisoned_allocations():
        out = fn(*make_args())
    for i, t in enumerate(_tensors(out)):
        nan = int(torch.isnan(t).sum()) if t.is_floating_point() else 0
        assert nan == 0, f"output {i}: {nan} NaN element(s) (unwritten, or invalid arithmetic)"
    if determinism:
        first = fn(*make_args())
        second = fn(*make_args())
        assert_bitwise_equal(first, second, "determinism (same inputs, two calls)")
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` over the elements where ``ref`` is finite (inf when
    ``out`` is not finite there)."""
    o = out.detach().cpu().double()
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    o, r = o[finite], ref[finite]
    if not bool(torch.isfinite(o).all()):
        return math.inf
    scale = max(float(r.abs().max()), 1e-30)
    return float((o - r).abs().max()) / scale


def record_error(request: pytest.FixtureRequest, err: float) -> None:
    """Attach ``err`` to the test as user property ``max_rel_err`` (the report keeps the max)."""
    request.node.user_properties.append(("max_rel_err", err))


def assert_close(out: Any, ref: torch.Tensor, dtype: torch.dtype, what: str,
                 request: pytest.FixtureRequest | None = None,
                 expect_dtype: torch.dtype | None = None) -> float:
    """Check ``out`` (a tensor) against the float64 oracle ``ref`` with ``dtype``'s bound.

    Shape must match; the output dtype must be ``expect_dtype`` (default ``dtype``); where
    ``ref`` is +-inf the output must be the same infinity. Returns the error.
    """
    assert isinstance(out, torch.Tensor), f"{what}: expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(ref.shape), \
        f"{what}: shape {list(out.shape)}, expected {list(ref.shape)}"
    want = expect_dtype or dtype
    assert out.dtype == want, f"{what}: dtype {out.dtype}, expected {want}"
    o = out.detach().cpu().double()
    err = rel_err(o, ref)
    if request is not None:
        record_error(request, err)
    nan = int(torch.isnan(o).sum())
    assert nan == 0, f"{what}: {nan} NaN element(s) (unwritten or invalid output)"
    inf = torch.isinf(ref)
    assert torch.equal(o[inf], ref[inf]), f"{what}: infinities differ from the oracle's"
    assert bool(torch.isfinite(o[~inf]).all()), \
        f"{what}: infinite values where the oracle is finite"
    bound = tolerance(dtype).max_rel_err
    assert err <= bound, f"{what}: max relative error {err:.3g} > {bound:g} ({dtype})"
    return err
