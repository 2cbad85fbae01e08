"""``benchmarks/bench_headline.py`` (issue 17): the floors' arithmetic on the real configs, and
its ``--smoke`` run (tiny models on the cpu) end to end: the JSON schema, the per-workload
files, fractions in (0, 1.2], and a profile attached where a target is missed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import floors  # noqa: E402

MODELS = ROOT / "benchmarks" / "models"
CEILINGS = {"copy_bandwidth_Bps": 4.2e12, "matmul_flops": 770e12}


def _cfg(name: str) -> dict:
    return json.loads((MODELS / name / "config.json").read_text())


def test_qwen3_moe_active_parameters_and_roofline() -> None:
    counts = floors.param_counts(_cfg("qwen3-30b-a3b"))
    assert counts.moe_layers == 48 and counts.num_experts == 128 and counts.top_k == 8
    assert counts.active == pytest.approx(3.04e9, rel=0.01)
    assert counts.all_experts + counts.non_expert == pytest.approx(30.2e9, rel=0.01)
    roof = floors.decode1_roofline(_cfg("qwen3-30b-a3b"), CEILINGS, 2)
    assert roof["roofline_tok_per_s"] == pytest.approx(690, rel=0.01)  # issue 17's figure


def test_dense_counts_match_the_llama_benchmarks_own() -> None:
    counts = floors.param_counts(_cfg("llama-3.1-8b"))
    assert counts.moe_layers == 0 and counts.router == 0
    # 8.03 B parameters, of which the embedding matrix minus one row is not read per token
    assert counts.active + 128256 * 4096 - 4096 == pytest.approx(8.03e9, rel=0.002)


def test_experts_touched_grows_to_all_of_them() -> None:
    assert floors.experts_touched(128, 8, 1) == pytest.approx(8)
    assert floors.experts_touched(128, 8, 256) == pytest.approx(128, abs=0.01)
    assert 8 < floors.experts_touched(128, 8, 4) < 32
    assert floors.experts_touched(0, 0, 256) == 0


def test_floors_of_the_issue_17_workloads() -> None:
    moe = floors.moe_offline_floor(_cfg("qwen3-30b-a3b"), 512, 1024, 256, CEILINGS, 256, 2)
    assert moe["decode_steps"] == 512
    assert 15.0 < moe["floor_s"] < 17.0  # "about 16.3 s" in the issue
    llama = _cfg("llama-3.1-8b")
    short, long = (floors.prefill_floor(llama, n, CEILINGS) for n in (8192, 100000))
    assert short["floor_s"] == pytest.approx(0.171, rel=0.02)
    assert long["attention_flops"] > long["linear_flops"]  # quadratic term dominates at 100k
    # causal attention: n new tokens over p cached ones = the difference of two prompts
    full = floors.causal_attention_flops(llama, 300)
    assert floors.causal_attention_flops(llama, 100, 200) == pytest.approx(
        full - floors.causal_attention_flops(llama, 200))


def test_smoke_run_writes_every_workload_next_to_its_floor(tmp_path: Path) -> None:
    out = tmp_path / "h200-latest.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_headline.py"),
                           "--smoke", "--out", str(out), "--workloads", "llama8b,qwen3moe",
                           "--profile", "llama8b_prefill_8k"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"device", "date", "commit", "workloads", "ceilings"} <= set(result)
    names = {"llama8b_decode1", "llama8b_offline", "llama8b_prefill_8k", "llama8b_prefill_32k",
             "llama8b_prefill_100k", "qwen3moe_decode1", "qwen3moe_offline"}
    assert set(result["workloads"]) == names
    assert result["errors"] == {} and result["skipped"] == {}
    for name, w in result["workloads"].items():
        assert {"value", "unit", "floor", "fraction"} <= set(w), name
        assert w["value"] > 0 and w["floor"] > 0, name
        assert 0 < w["fraction"] <= 1.2, (name, w)
        ratio = w["floor"] / w["value"] if w["unit"] == "s" else w["value"] / w["floor"]
        assert ratio == pytest.approx(w["fraction"], rel=1e-6), name
        detail = json.loads((tmp_path / f"h200-latest-{name}.json").read_text())
        assert detail["name"] == name and detail["value"] == w["value"]
    assert len(result["workloads"]["llama8b_prefill_100k"]["chunk_s"]) >= 3  # 160 tokens / 64
    eight = result["workloads"]["llama8b_prefill_8k"]
    assert len(eight["ttft_all_s"]) == 3 and eight["value"] == sorted(eight["ttft_all_s"])[1]
    # the smoke shapes miss every target: the profiled workload carries its top kernels
    top = result["workloads"]["llama8b_prefill_8k"]["profile_top"]
    assert top and all(row["self_ms"] >= 0 for row in top)
    assert "profile_top" not in result["workloads"]["llama8b_prefill_32k"]
    # the config-counted active weights agree with the runner's own count (MoE-aware both)
    moe = json.loads((tmp_path / "h200-latest-qwen3moe_decode1.json").read_text())
    assert moe["roofline"]["active_weight_bytes"] == pytest.approx(
        moe["detail"]["active_weight_bytes"], rel=0.02)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "h200-latest.png").stat().st_size > 0
    assert (tmp_path / "h200-latest-qwen3moe_offline.png").stat().st_size > 0


def test_side_by_side_runs_tag_the_summary(tmp_path: Path, monkeypatch) -> None:
    """``main_tagged`` (the rule scripts' entry) runs the headline with the given arguments
    and records the rule in the summary it wrote, keeping the rest."""
    import bench_headline

    seen = []

    def fake_main(argv):
        seen.append(argv)
        (tmp_path / "s.json").write_text(json.dumps({"workloads": {"w": 1}}))
        return 0

    monkeypatch.setattr(bench_headline, "main", fake_main)
    argv = ["--workloads", "llama8b_offline", "--out", str(tmp_path / "s.json")]
    assert bench_headline.main_tagged(argv, {"overlap_rule": "sync_when_waiting"}) == 0
    assert seen == [argv]
    assert json.loads((tmp_path / "s.json").read_text()) == {
        "workloads": {"w": 1}, "overlap_rule": "sync_when_waiting"}


def test_process_per_model_merges_each_models_run(tmp_path: Path) -> None:
    """``--process-per-model``: one fresh process per model, the per-workload files where a
    single run writes them, one summary with each model's own ceilings."""
    out = tmp_path / "h200-latest.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_headline.py"),
                           "--smoke", "--process-per-model", "--out", str(out), "--workloads",
                           "llama8b_decode1,qwen3moe_decode1"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("a process of its own") == 2
    result = json.loads(out.read_text())
    assert result["process_per_model"] is True and result["errors"] == {}
    assert set(result["workloads"]) == {"llama8b_decode1", "qwen3moe_decode1"}
    assert set(result["ceilings_per_model"]) == {"llama8b", "qwen3moe"}
    assert result["ceilings"] == result["ceilings_per_model"]["llama8b"]
    for name, w in result["workloads"].items():
        detail = json.loads((tmp_path / f"h200-latest-{name}.json").read_text())
        assert detail["value"] == w["value"] and detail["name"] == name


def test_process_per_model_reports_a_models_failure(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_headline.py"),
                           "--smoke", "--process-per-model", "--out", str(out), "--workloads",
                           "llama8b_decode1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HS_PLATFORM": "no_such_platform"})
    assert proc.returncode == 1
    result = json.loads(out.read_text())
    assert result["workloads"] == {}
    assert result["errors"] == {"llama8b": "the llama8b process exited with 1 and no summary"}
