"""The kernel registry: which implementations exist per op, and what each supports.

Plugins fill one :class:`KernelRegistry` through the ``heteroserve_register_kernels`` hook.
Nothing here runs on the hot path: :func:`heteroserve.core.kernels.dispatch.resolve_dispatch`
turns the registry into a plain dispatch table once per engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

ANY_PLATFORM = "*"


@dataclass(frozen=True)
class KernelRequest:
    """What the engine needs from every op, fixed at engine build time.

    ``page_size`` may be ``None`` before negotiation (the attention backend proposes one).
    ``quant_scheme`` names the checkpoint's linear scheme (``unquantized`` when plain).
    ``kv_lora_rank`` / ``qk_rope_head_dim``: the latent widths of an MLA model (None otherwise).
    ``kv_cache_dtype``: ``auto`` (the model dtype) or ``fp8_e4m3`` (the platform's fp8
    flavour; see :class:`~heteroserve.core.kernels.attention.AttentionConfig`).
    ``torch_compile``: the engine compiles the model (``--enable-torch-compile``); a platform
    whose compiler lays out the weights itself may then prefer a plain-weight implementation.
    """

    platform: str
    device_type: str
    dtype: torch.dtype
    head_size: int | None = None
    num_q_heads: int | None = None
    num_kv_heads: int | None = None
    page_size: int | None = None
    sliding_window: bool = False
    logit_cap: bool = False
    quant_scheme: str = "unquantized"
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    platform_page_sizes: tuple[int, ...] | None = None
    kv_cache_dtype: str = "auto"
    torch_compile: bool = False

    def with_page_size(self, page_size: int) -> KernelRequest:
        return replace(self, page_size=page_size)


@dataclass(frozen=True)
class Support:
    """Whether an implementation can serve a request; ``reason`` says why not."""

    ok: bool
    reason: str = ""

    @staticmethod
    def yes() -> Support:
        return Support(True)

    @staticmethod
    def no(reason: str) -> Support:
        return Support(False, reason)

    def __bool__(self) -> bool:
        return self.ok


def _supports_everything(_: KernelRequest) -> Support:
    return Support.yes()


@dataclass(frozen=True)
class KernelSpec:
    """One implementation of one op.

    ``load`` imports and returns the implementation (a function for function ops, a class for
    attention backends and linear methods); it is called only when the implementation is
    selected or tested, so vendor packages stay unimported otherwise. ``platforms`` lists the
    platform names it runs on (``"*"``: any torch device). ``native_on`` lists the platforms
    for which it is the native choice; elsewhere it counts as a fallback in reports.
    ``supports`` answers for a concrete request (``page_size`` may be ``None`` during page-size
    negotiation) and must not raise. Among supporting implementations the highest ``priority``
    wins. ``page_sizes`` (attention only) lists the KV page sizes the implementation accepts,
    preferred first (``None``: any); it is data so that negotiation needs no import.
    ``kv_cache_dtypes`` (attention only) lists the KV cache dtypes it reads and writes
    (``auto``: the model dtype; ``fp8_e4m3``).
    """

    op: str
    name: str
    load: Callable[[], Any]
    platforms: tuple[str, ...]
    priority: int = 0
    supports: Callable[[KernelRequest], Support] = _supports_everything
    native_on: tuple[str, ...] = ()
    provider: str = ""
    description: str = ""
    page_sizes: tuple[int, ...] | None = None
    kv_cache_dtypes: tuple[str, ...] = ("auto",)

    def runs_on(self, platform: str) -> bool:
        return ANY_PLATFORM in self.platforms or platform in self.platforms

    def is_native(self, platform: str) -> bool:
        return platform in self.native_on or (
            ANY_PLATFORM not in self.platforms and platform in self.platforms)

    def check(self, request: KernelRequest) -> Support:
        """Platform match first, then the implementation's own answer."""
        if not self.runs_on(request.platform):
            return Support.no(f"runs only on {', '.join(self.platforms)}")
        if (self.page_sizes is not None and request.page_size is not None
                and request.page_size not in self.page_sizes):
            return Support.no(f"page size {request.page_size} not in {list(self.page_sizes)}")
        if self.op == "attention" and request.kv_cache_dtype not in self.kv_cache_dtypes:
            return Support.no(f"kv cache dtype {request.kv_cache_dtype} not supported "
                              f"({', '.join(self.kv_cache_dtypes)})")
        try:
            return self.supports(request)
        except Exception as exc:  # a buggy predicate must not take the engine down
            return Support.no(f"supports() raised {type(exc).__name__}: {exc}")


class DuplicateKernelError(ValueError):
    """Two registrations share an (op, name) pair on an overlapping set of platforms."""


def _overlap(a: KernelSpec, b: KernelSpec) -> bool:
    return ANY_PLATFORM in a.platforms or ANY_PLATFORM in b.platforms or bool(
        set(a.platforms) & set(b.platforms))


@dataclass
class KernelRegistry:
    """All registered implementations, by op. Filled at start-up, read-only afterwards.

    An implementation name may repeat within an op only for disjoint platforms (the shared
    Triton kernels are ``triton`` on cuda, rocm and xpu alike), so ``--kernel OP=NAME`` means
    the same thing everywhere.
    """

    _specs: dict[str, list[KernelSpec]] = field(default_factory=dict)

    def register(self, spec: KernelSpec) -> None:
        """Add ``spec``. Raises :class:`DuplicateKernelError` if ``(op, name)`` is taken on a
        platform ``spec`` also runs on."""
        existing = self._specs.setdefault(spec.op, [])
        for other in existing:
            if other.name == spec.name and _overlap(other, spec):
                raise DuplicateKernelError(
                    f"kernel {spec.op}={spec.name} registered twice for overlapping platforms "
                    f"({other.provider or '?'}: {', '.join(other.platforms)}; "
                    f"{spec.provider or '?'}: {', '.join(spec.platforms)})")
        existing.append(spec)

    def ops(self) -> list[str]:
        return sorted(self._specs)

    def implementations(self, op: str) -> list[KernelSpec]:
        """Implementations of ``op``, highest priority first (name breaks ties)."""
        return sorted(self._specs.get(op, []), key=lambda s: (-s.priority, s.name))

    def get(self, op: str, name: str, platform: str | None = None) -> KernelSpec:
        """The implementation ``name`` of ``op`` (the one that runs on ``platform`` when
        given). Raises ``KeyError`` listing the known names."""
        matches = [s for s in self.implementations(op) if s.name == name
                   and (platform is None or s.runs_on(platform))]
        if not matches:
            known = ", ".join(sorted({s.name for s in self.implementations(op)})) or "none"
            where = f" on {platform}" if platform else ""
            raise KeyError(f"no implementation {name!r} of op {op!r}{where} (known: {known})")
        return matches[0]

    def for_all(self) -> Iterator[KernelSpec]:
        """Every registered implementation."""
        for op in self.ops():
            yield from self.implementations(op)

    def for_platform(self, platform: str) -> Iterator[KernelSpec]:
        """Every implementation that can run on ``platform``, op by op."""
        for op in self.ops():
            for spec in self.implementations(op):
                if spec.runs_on(platform):
                    yield spec
