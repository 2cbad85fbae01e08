"""SGLang's own ``bench_serving`` client (sglang 0.4.10, run as a script, never imported as
the sglang package) runs to its summary against heteroserve on every backend it offers for
an OpenAI-compatible or SGLang server.

The script is not part of this repository: ``.ci/run`` extracts it from the sglang wheel
into ``$HETEROSERVE_SGLANG_BENCH`` (default ``~/.cache/heteroserve/sglang-0.4.10/
bench_serving.py``); without it the test skips and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import ServerProcess
from platform_under_test import TEST_PLATFORM

BENCH = Path(os.environ.get(
    "HETEROSERVE_SGLANG_BENCH",
    Path.home() / ".cache" / "heteroserve" / "sglang-0.4.10" / "bench_serving.py"))
#: bench_serving's backends that talk to an SGLang or OpenAI-compatible server (the others,
#: trt, gserver and truss, are other servers' own protocols)
BACKENDS = ["sglang", "sglang-native", "sglang-oai", "sglang-oai-chat", "vllm", "vllm-chat",
            "lmdeploy", "lmdeploy-chat"]
NUM_PROMPTS = 4

pytestmark = pytest.mark.skipif(
    not BENCH.is_file(),
    reason=f"SGLang's bench_serving.py is not at {BENCH} (set HETEROSERVE_SGLANG_BENCH, or "
           "extract sglang/bench_serving.py from `pip download sglang==0.4.10 --no-deps`)")


@pytest.fixture(scope="module")
def bench_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[ServerProcess]:
    """No --served-model-name: the model id is the model folder, which bench_serving loads
    its tokenizer from (as it does with a hub id)."""
    argv = ["serve", str(tiny_model), "--host", "127.0.0.1", "--port", "{port}",
            "--platform", TEST_PLATFORM, "--log-level", "warning", "--disable-access-log"]
    proc = ServerProcess(None, tmp_path_factory.mktemp("bench") / "server.log", argv=argv)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_serving_runs_to_its_summary(bench_server: ServerProcess, backend: str,
                                           tmp_path: Path) -> None:
    out = tmp_path / "result.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(BENCH), "--backend", backend, "--base-url", bench_server.url,
           "--dataset-name", "random-ids", "--num-prompts", str(NUM_PROMPTS),
           "--random-input-len", "24", "--random-output-len", "6", "--random-range-ratio", "1",
           "--max-concurrency", "2", "--disable-tqdm", "--flush-cache", "--output-file", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                         cwd=tmp_path)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "Serving Benchmark Result" in log, log[-4000:]
    assert f"Successful requests:                     {NUM_PROMPTS}" in log, log[-4000:]
    import json

    result = json.loads(out.read_text().splitlines()[-1])
    assert result["completed"] == NUM_PROMPTS and result["total_output_tokens"] > 0
    assert result["mean_ttft_ms"] > 0
