"""Run ``hopper_ptx.py`` (Triton -> sm_90a PTX without a GPU) from a test process, which may
have ``TRITON_INTERPRET`` set: the compile runs in a child process without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent / "hopper_ptx.py"


def hopper_ptx(jobs: list[dict]) -> list[dict]:
    """``hopper_ptx.py``'s per-job results for ``jobs`` (see its docstring); fails the test
    with the compiler's error output when it cannot build them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(_SCRIPT), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
