"""Session-wide test set-up.

Without a GPU, Triton kernels run through the Triton interpreter. ``TRITON_INTERPRET`` must
be set before any ``@triton.jit`` function is defined, and any test (conformance, vendor
platforms) may import the Triton kernel modules first, so it is set here, before collection.
"""

from __future__ import annotations

import os


def _share_cores_between_xdist_workers() -> int | None:
    """Under pytest-xdist (the README's ``-n 2``) each worker's torch intra-op pool, and the
    engines and servers it starts (through ``OMP_NUM_THREADS``, which ``--cpu-threads auto``
    follows), get an equal share of the cores: a full-size pool per worker oversubscribes
    them and OpenMP's spinning threads slow both workers (the cpu conformance run on 2
    cores: 167 s serially, 247 s in two workers of 2 threads, 123 s in two of 1 thread).
    Returns the share, or None outside xdist or where ``OMP_NUM_THREADS`` was already set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    share = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    return share


_WORKER_THREADS = _share_cores_between_xdist_workers()

import torch  # noqa: E402 - after OMP_NUM_THREADS, which torch reads at import

if _WORKER_THREADS is not None:
    torch.set_num_threads(_WORKER_THREADS)  # in case a plugin imported torch first

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
