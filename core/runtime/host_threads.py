"""How many host threads torch's intra-op pool uses in an engine process, and on which cores.

``--cpu-threads`` (``ServerArgs.cpu_threads``) takes:

- ``auto`` (default): the cores this process may run on (its affinity mask), split evenly
  between the tensor-parallel ranks of this host; never more threads than torch would use.
  Where that share is :data:`RESERVE_FROM_CORES` cores or more and torch would fill all of
  them, one is left to the host threads (ZMQ sender and receiver, the ZMQ I/O thread), as
  vLLM's CPU backend reserves one: a host thread that preempts an intra-op worker stalls the
  whole parallel region, and one core of eight or more costs little compute.
- ``N``: exactly ``N`` threads, no binding (to bind to one core, write ``3-3``).
- a core list such as ``0-3,8``: bind the process to those cores (as vLLM's
  ``VLLM_CPU_OMP_THREADS_BIND`` does) and use one thread per core; with several
  tensor-parallel ranks, ``|``-separated lists give each rank its own (``0-3|4-7``). The
  cores the process could use before binding and that the list leaves out
  (:attr:`HostThreads.spare_cores`) are where the scheduler process runs its I/O threads
  (:func:`pin_current_thread`), off the compute cores.

Errors are one line naming ``--cpu-threads``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


#: ``auto`` leaves one core to the host threads from this many cores per rank up.
RESERVE_FROM_CORES = 8


@dataclass(frozen=True)
class HostThreads:
    """What :func:`apply_cpu_threads` set: the thread count and the cores bound (None: no
    binding was requested). ``spare_cores``: cores the process could run on before binding
    that the binding leaves free (empty: none, or no binding); the I/O threads go there."""

    threads: int
    cores: tuple[int, ...] | None
    spare_cores: tuple[int, ...] = ()

    def describe(self) -> str:
        where = "" if self.cores is None else f" bound to cores {_format_cores(self.cores)}"
        io = f"; I/O threads on cores {_format_cores(self.spare_cores)}" if self.spare_cores else ""
        return f"{self.threads} torch intra-op thread{'s' * (self.threads != 1)}{where}{io}"


def _format_cores(cores: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in cores) if len(cores) < 8 else f"{cores[0]}..{cores[-1]}"


def parse_core_list(text: str) -> tuple[int, ...]:
    """``"0-3,8"`` -> ``(0, 1, 2, 3, 8)``; ``ValueError`` naming ``--cpu-threads`` otherwise."""
    cores: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            first = int(lo)
            last = int(hi) if sep else first
            if first < 0 or last < first:
                raise ValueError
            cores.extend(range(first, last + 1))
    except ValueError:
        raise ValueError(f"--cpu-threads: {text!r} is not a core list like 0-3,8") from None
    return tuple(dict.fromkeys(cores))


def _owned_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API on this OS
        return os.cpu_count() or 1


def plan_cpu_threads(spec: str, tp_rank: int = 0, tp_size: int = 1,
                     torch_default: int | None = None) -> HostThreads:
    """The :class:`HostThreads` that ``spec`` means for this rank (nothing is applied)."""
    spec = spec.strip()
    default = torch_default if torch_default is not None else torch.get_num_threads()
    if spec == "auto":
        share = _owned_cores() // max(1, tp_size)
        threads = min(default, share)
        if threads == share >= RESERVE_FROM_CORES:
            threads -= 1  # one core for the host threads (module docstring)
        return HostThreads(max(1, threads), None)
    if spec.isdigit():
        if int(spec) < 1:
            raise ValueError("--cpu-threads must be >= 1, auto, or a core list like 0-3")
        return HostThreads(int(spec), None)
    lists = spec.split("|")
    if len(lists) not in (1, tp_size):
        raise ValueError(f"--cpu-threads: {len(lists)} core lists for {tp_size} "
                         "tensor-parallel ranks")
    cores = parse_core_list(lists[tp_rank if len(lists) > 1 else 0])
    return HostThreads(len(cores), cores)


def apply_cpu_threads(spec: str, tp_rank: int = 0, tp_size: int = 1) -> HostThreads:
    """Bind this process (when ``spec`` lists cores) and size torch's intra-op pool."""
    plan = plan_cpu_threads(spec, tp_rank, tp_size)
    if plan.cores is not None:
        try:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, plan.cores)
        except (AttributeError, OSError) as exc:
            raise ValueError(f"--cpu-threads: cannot bind to cores "
                             f"{_format_cores(plan.cores)}: {exc}") from None
        plan = HostThreads(plan.threads, plan.cores, tuple(sorted(before - set(plan.cores))))
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    return plan


def pin_current_thread(cores: tuple[int, ...]) -> None:
    """Run the calling thread on ``cores`` (Linux: the affinity of one thread); no-op for an
    empty tuple or where the OS has no affinity API. Never raises: a host thread that cannot
    move keeps working where it is."""
    if not cores:
        return
    try:
        os.sched_setaffinity(0, cores)
    except (AttributeError, OSError):
        pass
