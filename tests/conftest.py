"""Session-wide test set-up.

Without a GPU, Triton kernels run through the Triton interpreter. ``TRITON_INTERPRET`` must
be set before any ``@triton.jit`` function is defined, and any test (conformance, vendor
platforms) may import the Triton kernel modules first, so it is set here, before collection.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
