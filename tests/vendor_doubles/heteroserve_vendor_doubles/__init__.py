"""Test-only CPU doubles of torch_npu, aiter, IPEX and flashinfer, and a way to put them in
``sys.modules``.

Never installed: tests and the conformance run put ``tests/vendor_doubles`` on ``sys.path``.
The doubles implement the documented semantics of exactly the vendor calls heteroserve's npu,
rocm, xpu and cuda (flashinfer) adapters make (see each module). Each vendor's module objects are built once per
process, so kernel modules that bound them at import keep seeing the same objects.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

VENDORS = ("npu", "rocm", "xpu", "cuda")
_BUILT: dict[str, dict[str, types.ModuleType]] = {}


def modules(vendor: str) -> dict[str, types.ModuleType]:
    """The double modules of ``vendor`` (``npu``, ``rocm``, ``xpu`` or ``cuda``: flashinfer),
    by module name."""
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor double {vendor!r}; known: {', '.join(VENDORS)}")
    if vendor not in _BUILT:
        if vendor == "npu":
            from heteroserve_vendor_doubles import torch_npu_double

            _BUILT[vendor] = {"torch_npu": torch_npu_double.build()}
        elif vendor == "rocm":
            from heteroserve_vendor_doubles import aiter_double

            _BUILT[vendor] = aiter_double.build()
        elif vendor == "cuda":
            from heteroserve_vendor_doubles import flashinfer_double

            _BUILT[vendor] = flashinfer_double.build()
        else:
            from heteroserve_vendor_doubles import ipex_double

            _BUILT[vendor] = ipex_double.build()
        for name, module in _BUILT[vendor].items():  # importlib.util.find_spec needs a spec
            module.__spec__ = importlib.machinery.ModuleSpec(
                name, None, origin="heteroserve test double",
                is_package=hasattr(module, "__path__"))
    return _BUILT[vendor]


def install(vendor: str) -> None:
    """Put ``vendor``'s doubles into ``sys.modules``. Refuses to shadow a real vendor module."""
    for name, module in modules(vendor).items():
        present = sys.modules.get(name)
        if present is not None and not getattr(present, "__heteroserve_double__", False) \
                and "." not in name:
            raise RuntimeError(f"the real {name} is imported; refusing to shadow it")
        sys.modules[name] = module


def uninstall(vendor: str) -> None:
    """Remove ``vendor``'s doubles from ``sys.modules`` (real modules are left alone)."""
    for name, module in modules(vendor).items():
        if sys.modules.get(name) is module:
            del sys.modules[name]


@contextmanager
def installed(vendor: str) -> Iterator[types.ModuleType]:
    """``with installed("npu") as torch_npu: ...``: the doubles are importable inside."""
    already = all(sys.modules.get(n) is m for n, m in modules(vendor).items())
    install(vendor)
    try:
        yield next(iter(modules(vendor).values()))
    finally:
        if not already:
            uninstall(vendor)
