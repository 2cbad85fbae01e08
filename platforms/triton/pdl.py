"""Programmatic dependent launch (PDL) for the kernels of the decode chain.

At batch 1 a decode step is a chain of about seven short kernels per layer, and each kernel
boundary costs the launch of the next grid after the previous one drains. With PDL (NVIDIA
Hopper and later) a kernel is launched with ``launch_pdl=True``; its programs may then be
scheduled while the previous kernel's last programs still run, and they wait in
:func:`wait_for_previous` (``griddepcontrol.wait``) until that kernel has finished and its
writes are visible. Right after the wait they allow the next kernel to launch the same way.

Invariant for every kernel that takes ``USE_PDL``: it calls :func:`wait_for_previous` before
its first load of anything another kernel writes and before its first store. Data the previous
kernel cannot be writing (a model's loaded weights) may be read earlier: programs of this
kernel start only after every program of the previous one has passed its own wait, so
everything before that kernel is complete.
Kernels launched without PDL (torch's, cuBLAS) serialise as usual, so mixing is safe.

``HETEROSERVE_TRITON_PDL=0`` switches it off (for measurements side by side).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=16)
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: a CUDA device of compute capability 9
    or later, a Triton whose CUDA backend has the ``launch_pdl`` option, and
    ``HETEROSERVE_TRITON_PDL`` not ``0``."""
    if device.type != "cuda" or torch.version.cuda is None:
        return False
    if os.environ.get("HETEROSERVE_TRITON_PDL", "1") == "0":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def pdl_args(device: torch.device) -> dict[str, Any]:
    """Keyword arguments for a launch of a kernel with a ``USE_PDL`` constexpr: both the
    constexpr and Triton's ``launch_pdl`` option, always set together."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """Wait until the previous kernel on the stream has finished (its writes visible), then
    let the next kernel launch. A no-op without ``USE_PDL``."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(ptrs, USE_PDL: tl.constexpr):
    """Ask the L2 to fetch the lines holding ``ptrs`` (any shape; a hint, no registers held,
    nothing returned) before :func:`wait_for_previous`, so that a kernel's first parameter
    reads are under way while the previous kernel drains. Only for data no kernel writes
    (the invariant above). A no-op without ``USE_PDL`` (the interpreter has no PTX)."""
    if USE_PDL:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [ptrs], dtype=tl.int32, is_pure=False, pack=1)
