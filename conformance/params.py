"""Parametrisation of conformance tests by (op, implementation, case).

A test declares its cases with :func:`conformance`; the suite's ``conftest.py`` expands it
into one pytest parameter per (case, implementation) named ``<op>-<impl>-<case>``. A case the
platform's plugin skips (``skip_ops``), the platform's capabilities rule out, or the
implementation's ``KernelSpec.check`` refuses becomes a skipped parameter whose reason the
report lists; nothing is dropped silently. Claims probing runs a sample of the cases an
implementation refuses anyway (as non-strict xfail parameters): one that passes is reported
as "supported but unclaimed", so ``supports()`` predicates stay honest both ways.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import torch

from heteroserve.core.kernels.registry import KernelSpec

if TYPE_CHECKING:
    from heteroserve.conformance.context import ConformanceContext

MARKER = "conformance"


@dataclass(frozen=True)
class Case:
    """One input configuration of an op. ``name`` is readable and unique within the op;
    ``dtype`` is the model dtype of the request. Subclasses add the shapes and options."""

    op: str
    name: str
    dtype: torch.dtype

    def request_fields(self) -> dict[str, Any]:
        """Extra :class:`KernelRequest` fields this case needs (head size, page size, ...)."""
        return {}

    def capability_skip(self, ctx: ConformanceContext) -> str | None:
        """Why the platform's declared capabilities rule this case out, or None."""
        return ctx.dtype_skip(self.dtype)

    @property
    def seed(self) -> int:
        """A stable seed derived from the case, for reproducible inputs on every platform."""
        return zlib.crc32(f"{self.op}/{self.name}".encode())

    def generator(self, salt: int = 0) -> torch.Generator:
        """A host generator seeded from :attr:`seed` + ``salt``."""
        return torch.Generator().manual_seed(self.seed + salt)


@dataclass(frozen=True)
class ConfParam:
    """What one parametrised test runs: ``label`` (the report's op column), the
    implementation ``spec`` (None for platform-level checks, named by ``impl``) and ``case``."""

    label: str
    impl: str
    native: bool
    case: Case
    spec: KernelSpec | None = None
    #: why the implementation refused this case when the parameter is a claims probe
    probe_refusal: str = ""

    @property
    def id(self) -> str:
        """The pytest id: ``<op>-<impl>-<case>`` (so ``-k <impl>`` selects one implementation),
        ``-probe`` appended for a claims probe."""
        base = f"{self.label}-{self.impl}-{self.case.name}"
        return f"{base}-probe" if self.probe_refusal else base

    def load(self) -> Any:
        """The implementation (function or class); a failing ``load`` fails the test."""
        if self.spec is None:
            pytest.fail(f"no implementation of {self.case.op} can run on this platform",
                        pytrace=False)
        try:
            return self.spec.load()
        except Exception as exc:
            pytest.fail(f"{self.spec.op}={self.spec.name}: load() raised "
                        f"{type(exc).__name__}: {exc}", pytrace=False)


CaseSource = Callable[["ConformanceContext"], Sequence[Case]]


def conformance(cases: CaseSource, label: str | None = None,
                impl: str | None = None) -> pytest.MarkDecorator:
    """Mark a test taking a ``conf`` argument: run it for every case of ``cases(ctx)`` and
    every implementation of the case's op. ``label`` overrides the op name in ids and the
    report (e.g. ``graph_replay``); ``impl`` names a platform-level check that runs once per
    case instead of once per implementation."""
    return getattr(pytest.mark, MARKER)(cases=cases, label=label, impl=impl)


def _skip_reason(ctx: ConformanceContext, case: Case, spec: KernelSpec | None,
                 label: str) -> str | None:
    return _skip(ctx, case, spec, label)[0]


def _skip(ctx: ConformanceContext, case: Case, spec: KernelSpec | None,
          label: str) -> tuple[str | None, bool]:
    """``(reason, refused by the implementation itself)``."""
    for op in (label, case.op):
        if op in ctx.skip_ops:
            return f"skip_ops of platform {ctx.name}: {ctx.skip_ops[op]}", False
    reason = case.capability_skip(ctx)
    if reason:
        return reason, False
    if spec is not None:
        support = spec.check(ctx.request(case.dtype, **case.request_fields()))
        if not support.ok:
            return f"{spec.name} does not support this case: {support.reason}", True
    return None, False


def _probe(conf: ConfParam, reason: str) -> Any:
    """A claims probe: the refused case run anyway; passing means "supported but unclaimed",
    failing means the refusal was honest. Informational: it never fails the run."""
    probe = ConfParam(conf.label, conf.impl, conf.native, conf.case, conf.spec, reason)
    mark = pytest.mark.xfail(reason=f"claims probe: {reason}", strict=False)
    return pytest.param(probe, id=probe.id, marks=[mark])


def _param(conf: ConfParam, reason: str | None) -> Any:
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(conf, id=conf.id, marks=marks)


def build_params(ctx: ConformanceContext, cases: CaseSource, label: str | None = None,
                 impl: str | None = None) -> list[Any]:
    """Expand ``cases`` into pytest parameters (see the module docstring). The first
    ``ctx.probes_per_test`` cases each implementation refuses (its own ``supports()``, not
    the platform's capabilities) are also run as claims probes."""
    params = []
    probes: dict[str, int] = {}
    for case in cases(ctx):
        name = label or case.op
        if impl is not None:
            conf = ConfParam(name, impl, True, case)
            params.append(_param(conf, _skip_reason(ctx, case, None, name)))
            continue
        specs = ctx.specs(case.op)
        if not specs:  # a platform must be able to run every op: a failing parameter
            params.append(_param(ConfParam(name, "none", False, case), None))
        for spec in specs:
            conf = ConfParam(name, spec.name, spec.is_native(ctx.name), case, spec)
            reason, refused = _skip(ctx, case, spec, name)
            params.append(_param(conf, reason))
            if refused and reason and probes.get(spec.name, 0) < ctx.probes_per_test:
                probes[spec.name] = probes.get(spec.name, 0) + 1
                params.append(_probe(conf, reason))
    return params
