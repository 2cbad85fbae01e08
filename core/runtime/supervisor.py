"""Start, watch and stop the scheduler processes.

Each tensor-parallel rank of this node runs ``python -m heteroserve.core.runtime.scheduler_main``
as a fresh interpreter (so a caller's script is never re-imported: ``heteroserve.Engine``
works in a plain script without a ``__main__`` guard). The :class:`LaunchSpec` goes in on the
child's stdin; readiness comes back on a private pipe as exactly one pickled
``("ready", ReadyInfo)`` or ``("error", one line)``. Children run in their own session, so a
Ctrl-C or a group-wide SIGTERM reaches only the caller, which then stops them in order; they
also exit by themselves when the caller's process is gone.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from heteroserve.core.config import ServerArgs
from heteroserve.core.runtime.io_struct import ReadyInfo
from heteroserve.core.runtime.transport import Addresses

ENTRY_MODULE = "heteroserve.core.runtime.scheduler_main"


@dataclass
class LaunchSpec:
    """Everything one scheduler process needs; pickled to its stdin. ``factory`` (a picklable,
    importable callable ``(server_args, eos_token_ids) -> (scheduler, ReadyInfo)``) replaces
    how the scheduler is built, for tests; None builds the real one."""

    server_args: ServerArgs
    eos_token_ids: list[int]
    addresses: Addresses
    parent_pid: int
    tp_rank: int
    ready_fd: int
    factory: Callable[..., object] | None = None


class Supervisor:
    """The scheduler processes of this node (one per local rank). Construct, then
    :meth:`wait_ready`; :meth:`dead_rank` is the watchdog's probe; :meth:`stop` ends them."""

    def __init__(self, server_args: ServerArgs, eos_token_ids: list[int], addresses: Addresses,
                 num_ranks: int, factory: Callable[..., object] | None = None) -> None:
        self.procs: list[subprocess.Popen] = []
        self._ready_fds: list[int] = []
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        for rank in range(num_ranks):
            read_fd, write_fd = os.pipe()
            spec = LaunchSpec(server_args, list(eos_token_ids), addresses, os.getpid(), rank,
                              write_fd, factory)
            proc = subprocess.Popen([sys.executable, "-m", ENTRY_MODULE], stdin=subprocess.PIPE,
                                    pass_fds=(write_fd,), start_new_session=True, env=env)
            os.close(write_fd)
            assert proc.stdin is not None
            proc.stdin.write(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))
            proc.stdin.close()
            self.procs.append(proc)
            self._ready_fds.append(read_fd)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_ready(self, timeout: float) -> ReadyInfo:
        """Block until every rank reported ready; returns rank 0's :class:`ReadyInfo`.
        Raises ``RuntimeError`` (one line, the child's own error where it sent one) when a
        rank fails, exits, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        infos: list[ReadyInfo] = []
        try:
            for rank, fd in enumerate(self._ready_fds):
                infos.append(self._wait_one(rank, fd, deadline, timeout))
        finally:
            for fd in self._ready_fds:
                os.close(fd)
            self._ready_fds = []
        return infos[0]

    def _wait_one(self, rank: int, fd: int, deadline: float, timeout: float) -> ReadyInfo:
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"engine start-up timed out after {timeout:.0f}s")
            readable, _, _ = select.select([fd], [], [], min(left, 0.2))
            if readable:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    data += chunk
                    continue
                break  # EOF: the child closed the pipe (sent its message, or died)
            if self.procs[rank].poll() is not None and not data:
                break
        if data:
            kind, payload = pickle.loads(data)
            if kind == "ready":
                return payload
            raise RuntimeError(f"engine start-up failed: {payload}")
        code = self.procs[rank].wait(5)
        raise RuntimeError(f"engine start-up failed: scheduler process tp{rank} exited with "
                           f"code {code} (see its log above)")

    def dead_rank(self) -> int | None:
        """The first local rank whose process has exited, or None."""
        return next((i for i, p in enumerate(self.procs) if p.poll() is not None), None)

    def exit_code(self, rank: int) -> int | None:
        return self.procs[rank].poll()

    def kill(self) -> None:
        """SIGKILL every rank still running (ranks wait on each other forever)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the ranks to exit (after a shutdown message), then
        terminate, then kill."""
        for proc in self.procs:
            for action in (None, proc.terminate, proc.kill):
                if action is not None:
                    action()
                try:
                    proc.wait(timeout if action is None else 5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for fd in self._ready_fds:
            os.close(fd)
        self._ready_fds = []
