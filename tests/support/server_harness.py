"""Helpers for the HTTP server tests (``tests/server``): ``heteroserve serve`` processes on
free loopback ports, and ``/metrics`` readers.

:class:`ServerProcess` starts ``python -m heteroserve.server.cli serve`` in a subprocess,
waits (bounded) for ``/health`` and stops it with SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from platform_under_test import TEST_PLATFORM

API_KEY = "sk-heteroserve-test"
MODEL_NAME = "tiny-llama"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One ``heteroserve serve`` subprocess on 127.0.0.1 (see the module docstring)."""

    def __init__(self, model_path: Path | None, log_path: Path, *extra: str,
                 argv: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        """``argv``: a whole ``heteroserve`` command line instead of the harness's (each
        ``{port}`` in it becomes the free port; ``model_path`` and ``extra`` are unused)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if argv is not None:
            cmd = [sys.executable, "-m", "heteroserve.server.cli",
                   *(a.replace("{port}", str(self.port)) for a in argv)]
        else:
            cmd = [sys.executable, "-m", "heteroserve.server.cli", "serve",
                   "--model-path", str(model_path), "--served-model-name", MODEL_NAME,
                   "--host", "127.0.0.1", "--port", str(self.port), "--platform", TEST_PLATFORM,
                   "--log-level", "warning", "--disable-access-log", *extra]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_healthy()

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0, trust_env=False
                             ).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {START_TIMEOUT_S}s:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed with prometheus_client: sample name -> value, for the samples
        labelled with the served model name only (histogram buckets and per-reason
        counters are left out; see :func:`labelled_samples`)."""
        text = httpx.get(self.url + "/metrics", timeout=10.0, trust_env=False).text
        return model_samples(text)

    def wait_metrics(self, predicate, timeout: float = 20.0) -> dict[str, float]:
        """Poll ``/metrics`` until ``predicate(metrics)`` holds (bounded); returns the last
        snapshot either way."""
        deadline = time.monotonic() + timeout
        snapshot = self.metrics()
        while not predicate(snapshot) and time.monotonic() < deadline:
            time.sleep(0.1)
            snapshot = self.metrics()
        return snapshot

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (bounded; SIGKILL after ``timeout``), return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return int(self.proc.returncode)


def model_samples(text: str) -> dict[str, float]:
    """Sample name -> value of an exposition's samples whose only label is
    ``model_name=MODEL_NAME``."""
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.labels == {"model_name": MODEL_NAME}}


def labelled_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value for every sample of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kv_idle(m: dict[str, float]) -> bool:
    """The engine holds no request: nothing running, queued or in flight, no KV slot used
    by a request (evictable prefix-cache entries do not count)."""
    return (m.get("heteroserve:num_requests_running") == 0
            and m.get("heteroserve:num_requests_waiting") == 0
            and m.get("heteroserve:num_requests_inflight") == 0
            and m.get("heteroserve:kv_used_tokens") == 0)
