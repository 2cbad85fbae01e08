"""``benchmarks/bench_http.py``: its report arithmetic, the word-level tokenizer it gives a
config-only model, and (slow) its ``--smoke`` run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_http import parse_levels  # noqa: E402
from word_tokenizer import build_word_tokenizer  # noqa: E402
from bench_http_report import Level, evaluate_targets, level_table  # noqa: E402


def test_levels_parse_and_reject_bad_specs() -> None:
    assert parse_levels("1:16,256:512") == [Level(1, 16), Level(256, 512)]
    with pytest.raises(ValueError, match="'4' is not CONCURRENCY:NUM_PROMPTS"):
        parse_levels("1:2,4")
    with pytest.raises(ValueError, match="positive"):
        parse_levels("0:3")


def _summary(out_tok_s: float, per_token: float, ttft: float, gap: float) -> dict:
    return {"failed": 0, "output_throughput": out_tok_s, "total_throughput": 5 * out_tok_s,
            "chunks_with_text_per_reply": 256 * per_token, "chunks_with_text_per_token": per_token,
            "ttft_ms_p50": ttft, "ttft_ms_p99": 2 * ttft, "itl_ms_p50": gap, "itl_ms_p99": 3 * gap}


def test_table_puts_http_next_to_offline_and_evaluates_the_targets() -> None:
    levels = [Level(1, 8), Level(16, 32)]
    report = {
        "http": {"levels": [
            {"concurrency": 1, "summary": _summary(150.0, 1.0, 40.0, 6.0)},
            {"concurrency": 16, "summary": _summary(1900.0, 0.25, 90.0, 40.0)}]},
        "offline": {"ttft_c1": {"ttft_ms_p50": 30.0},
                    "decode_step": {"1": {"step_ms": 5.0, "batch_output_tok_s": 190.0},
                                    "16": {"step_ms": 8.0, "batch_output_tok_s": 1950.0}},
                    "throughput": {"output_throughput": 2000.0}},
    }
    rows = level_table(report, levels)
    assert [r["concurrency"] for r in rows] == [1, 16]
    assert rows[0]["gap_p50_over_step"] == pytest.approx(1.2)
    assert rows[1]["gap_p50_over_step"] == pytest.approx(5.0)
    assert rows[1]["inter_chunk_gap_ms_p99"] == 120.0
    assert rows[1]["offline_batch_output_tok_s"] == 1950.0
    t = evaluate_targets(report, rows, levels)
    assert t["chunks_with_text_per_token_min"] == 0.25 and t["chunks_per_token_ge_0.95"] is False
    assert t["gap_p50_over_step_max"] == pytest.approx(5.0)
    assert t["gap_p50_le_1.2x_step"] is False
    assert t["ttft_p50_c1_minus_offline_ms"] == pytest.approx(10.0)
    assert t["ttft_c1_within_15ms"] is True
    assert t["http_over_offline_throughput"] == pytest.approx(0.95)
    assert t["throughput_ge_0.97x"] is False
    partial = evaluate_targets({"http": report["http"]}, level_table(
        {"http": report["http"]}, levels), levels)
    assert partial["gap_p50_le_1.2x_step"] is None and partial["throughput_ge_0.97x"] is None


def test_word_tokenizer_gives_every_model_id_its_own_text(tmp_path: Path) -> None:
    from heteroserve.core.tokenizer import load_tokenizer
    from heteroserve.core.tokenizer.detokenizer import IncrementalDetokenizer

    tok = load_tokenizer(build_word_tokenizer(tmp_path / "tok", 300))
    assert tok.vocab_size == 300 and tok.hf.all_special_ids == [0] == sorted(tok.eos_token_ids)
    det = IncrementalDetokenizer(tok, [5, 6, 299])
    assert [det.add([i]) for i in (1, 299, 17)] == [" w1", " w299", " w17"]


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_http.py"), "--smoke",
                          "--out-dir", str(tmp_path), "--no-plot"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "http_serving_smoke.json").read_text())
    assert [r["concurrency"] for r in report["table"]] == [1, 2]
    for row in report["table"]:
        assert row["failed"] == 0 and row["http_output_tok_s"] > 0
        assert row["chunks_with_text_per_token"] is not None
        assert row["offline_decode_step_ms"] is not None  # a difference of timings: any sign
    assert report["offline"]["ttft_c1"]["ttft_ms_p50"] > 0
    assert report["offline"]["throughput"]["output_tokens"] == 4 * 4
    assert report["http"]["exit_code"] == 0 and report["commit"]
