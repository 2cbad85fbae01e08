"""``heteroserve bench serve`` against a real ``heteroserve serve`` of the tiny model (the
session's shared server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_harness import API_KEY, ServerProcess

from heteroserve.server.cli import main


def _bench(server: ServerProcess, report: Path, *extra: str) -> dict:
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", API_KEY,
               "--disable-tqdm", "--output-json", str(report), *extra])
    data = json.loads(report.read_text())
    assert rc == 0, data["summary"]["errors"]
    return data["summary"]


def test_random_ids_over_completions(server: ServerProcess, tmp_path: Path) -> None:
    m = _bench(server, tmp_path / "ids.json", "--dataset", "random-ids", "--vocab-size", "500",
               "--num-prompts", "4", "--input-len", "16", "--output-len", "6",
               "--max-concurrency", "2")
    assert (m["completed"], m["failed"]) == (4, 0)
    assert m["output_tokens_from"] == "usage"
    assert m["total_input_tokens"] == 4 * 16 and m["total_output_tokens"] == 4 * 6  # ignore_eos
    assert 0 < m["chunks_with_text_per_token"] <= 1  # at most one text event per token
    assert m["ttft_ms_p50"] > 0 and m["e2e_ms_p50"] >= m["ttft_ms_p50"]


def test_random_text_over_chat(server: ServerProcess, tmp_path: Path) -> None:
    m = _bench(server, tmp_path / "chat.json", "--endpoint", "chat", "--dataset", "random",
               "--num-prompts", "2", "--input-len", "8", "--output-len", "4")
    assert (m["completed"], m["failed"]) == (2, 0) and m["total_output_tokens"] == 8
    assert m["total_input_tokens"] > 2 * 8  # the chat template's tokens, from usage


def test_wrong_key_is_reported_as_the_status(server: ServerProcess,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "serve", "--base-url", server.url, "--api-key", "wrong", "--model",
               "tiny-llama", "--num-prompts", "1", "--warmup-requests", "0", "--disable-tqdm"])
    assert rc == 1 and "http 401: 1" in capsys.readouterr().out
