"""Run this folder's Triton kernels on CPU tensors through the Triton interpreter when no GPU
is visible, compiled on the GPU otherwise.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated (before their modules are
imported) and stay set while they run, so it is set here, at collection, for the session.
Only Triton code reads it; the cuda plugin's kernels are registered for platform ``cuda``
alone, so no dispatch elsewhere in the session changes.
"""

from __future__ import annotations

import pytest
import torch

HAS_GPU = torch.cuda.is_available()  # tests/conftest.py sets TRITON_INTERPRET without one


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU (interpreted)."""
    return torch.device("cuda" if HAS_GPU else "cpu")
