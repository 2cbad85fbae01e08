"""Can Triton run here? Answers without importing triton (``importlib.util.find_spec``)."""

from __future__ import annotations

import importlib.util
import os
import sys

#: torch device types Triton has a code generator for ("cuda" covers NVIDIA and AMD/HIP).
TRITON_DEVICE_TYPES: tuple[str, ...] = ("cuda", "xpu")


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels then run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_missing() -> str | None:
    """Why triton cannot be imported here, or None when it can (imports nothing)."""
    if "triton" in sys.modules:
        return None
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else "triton is not installed (pip install triton)"


def device_unsupported(device_type: str) -> str | None:
    """Why Triton cannot target torch device type ``device_type``, or None when it can.
    ``cpu`` is accepted only under the interpreter (``TRITON_INTERPRET=1``)."""
    if device_type in TRITON_DEVICE_TYPES:
        return None
    if device_type == "cpu" and interpreter_enabled():
        return None
    return f"Triton has no backend for device type {device_type!r}"
