"""``python -m heteroserve.core.runtime.scheduler_main``: one scheduler process.

Reads a pickled :class:`~heteroserve.core.runtime.supervisor.LaunchSpec` from stdin and runs
:func:`~heteroserve.core.runtime.scheduler_process.run_scheduler_process`. Started only by the
:class:`~heteroserve.core.runtime.supervisor.Supervisor`.
"""

from __future__ import annotations

import pickle
import signal
import sys


def main() -> None:
    # the caller stops this process (shutdown message, then terminate); Ctrl-C in a terminal
    # must reach only the caller, which drains its requests first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = pickle.loads(sys.stdin.buffer.read())
    from heteroserve.core.runtime.scheduler_process import run_scheduler_process

    run_scheduler_process(spec)


if __name__ == "__main__":
    main()
