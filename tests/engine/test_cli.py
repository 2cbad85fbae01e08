"""``heteroserve generate`` and ``heteroserve bench`` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ENGINE_FLAGS = ["--platform", "cpu", "--max-total-tokens", "4096", "--log-level", "warning"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heteroserve.server.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_every_prompt_with_the_chat_template(tiny_model: Path) -> None:
    out = _cli("generate", "--model-path", str(tiny_model), *ENGINE_FLAGS, "--prompt", "Hello",
               "--prompt", "The sun", "--max-new-tokens", "5", "--temperature", "0", "--json",
               "--chat", "--system", "Be brief.")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["Hello", "The sun"] and rows[0]["chat"]
    assert rows[0]["meta_info"]["prompt_tokens"] > 10  # system + user turns of the template
    assert all(len(r["output_ids"]) <= 5 and r["meta_info"]["finish_reason"] for r in rows)


def test_generate_bad_flag_errors_in_one_line_before_start(tiny_model: Path) -> None:
    out = _cli("generate", "--model-path", str(tiny_model), *ENGINE_FLAGS, "--prompt", "Hi",
               "--max-new-tokens", "3", "--temperature", "-1")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("heteroserve generate: error:")
    assert "temperature" in out.stderr


def test_bench_writes_metrics(tiny_model: Path, tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    out = _cli("bench", "--model-path", str(tiny_model), *ENGINE_FLAGS, "--load-format", "dummy",
               "--workload", "shared-prefix", "--num-prompts", "6", "--num-groups", "2",
               "--prefix-len", "48", "--input-len", "8", "--output-len", "4",
               "--output-json", str(report), "--plot", str(tmp_path / "bench.png"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "TTFT p50 / p99" in out.stdout and "cache hit rate" in out.stdout
    m = json.loads(report.read_text())
    assert m["completed"] == 6 and m["failed"] == 0
    assert m["total_input_tokens"] == 6 * 56 and m["total_output_tokens"] == 6 * 4
    for key in ("request_throughput", "input_throughput", "output_throughput",
                "total_throughput", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"):
        assert m[key] > 0, key
    assert m["cache_hit_rate"] > 0  # later prompts of a group reuse its prefix
    assert 0 < m["peak_kv_usage"] <= 1
