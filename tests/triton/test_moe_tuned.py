"""The tuned grouped-GEMM tables (``platforms/triton/moe_tuned.py``) and the script that
writes them (``benchmarks/moe_tune.py``): lookup, file checks, candidates, the ``--smoke``
run end to end (Triton interpreter, tiny shape) and the merge into a table file."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from heteroserve.platforms.triton import moe_tuned

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import moe_tune  # noqa: E402

GATE, DOWN = [16, 128, 128, 4, 3], [16, 64, 128, 4, 3]
BIG_GATE, BIG_DOWN = [64, 128, 64, 8, 4], [64, 256, 64, 8, 3]


def _write(path: Path, tables: dict) -> Path:
    path.write_text(json.dumps({"device": "X", "tables": tables}))
    moe_tuned.load_table.cache_clear()
    moe_tuned.device_entries.cache_clear()
    return path


def test_names_and_keys() -> None:
    assert moe_tuned.table_file("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"
    assert moe_tuned.shape_key(torch.bfloat16, 128, 2048, 768) == "bfloat16 E=128 H=2048 I=768"


def test_nearest_entry_in_log_scale(tmp_path: Path) -> None:
    key = "bfloat16 E=128 H=2048 I=768"
    path = _write(tmp_path / "t.json", {key: {
        "128": {"gate_up": GATE, "down": DOWN}, "2048": {"gate_up": BIG_GATE, "down": BIG_DOWN}}})
    entries = moe_tuned.load_table(path)[key]
    assert [e[0] for e in entries] == [128, 2048]
    assert moe_tuned.nearest(entries, 100) == (tuple(GATE), tuple(DOWN))
    assert moe_tuned.nearest(entries, 511) == (tuple(GATE), tuple(DOWN))  # log2: 8.997 vs 11
    assert moe_tuned.nearest(entries, 513) == (tuple(BIG_GATE), tuple(BIG_DOWN))
    assert moe_tuned.nearest(entries, 1 << 20) == (tuple(BIG_GATE), tuple(BIG_DOWN))
    assert moe_tuned.load_table(tmp_path / "absent.json") == {}


@pytest.mark.parametrize("row,match", [
    ({"gate_up": GATE, "down": BIG_DOWN}, "BLOCK_M"),
    ({"gate_up": [16, 128, 128, 4], "down": DOWN}, "five ints"),
    ({"gate_up": GATE}, "down"),
])
def test_malformed_tables_are_refused(tmp_path: Path, row: dict, match: str) -> None:
    path = _write(tmp_path / "bad.json", {"k": {"256": row}})
    with pytest.raises((ValueError, KeyError), match=match):
        moe_tuned.load_table(path)


def test_no_table_on_cpu_or_for_an_untuned_shape(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    assert moe_tuned.tuned_configs(256, torch.bfloat16, 128, 2048, 768,
                                   torch.device("cpu")) is None
    key = moe_tuned.shape_key(torch.bfloat16, 128, 2048, 768)
    _write(tmp_path / "Fake_GPU.json", {key: {"256": {"gate_up": GATE, "down": DOWN}}})
    monkeypatch.setattr(moe_tuned, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(moe_tuned, "device_name", lambda device: "Fake GPU")
    fake = torch.device("meta")  # any non-CPU device: only its name is read
    assert moe_tuned.tuned_configs(300, torch.bfloat16, 128, 2048, 768, fake) == \
        (tuple(GATE), tuple(DOWN))
    assert moe_tuned.tuned_configs(300, torch.bfloat16, 64, 2048, 768, fake) is None
    assert moe_tuned.tuned_configs(300, torch.float8_e4m3fn, 128, 2048, 768, fake) is None


def test_committed_tables_load() -> None:
    """Every table shipped in the package parses, and its tiles fit the kernel's rules."""
    for path in sorted(moe_tuned.TUNED_DIR.glob("*.json")):
        for key, entries in moe_tuned.load_table(path).items():
            assert entries, (path, key)
            for _, gate, down in entries:
                for bm, bn, bk, warps, stages in (gate, down):
                    assert bm in (16, 32, 64, 128) and 128 % bk == 0 and warps in (4, 8)


def test_candidates_share_memory_and_block_m() -> None:
    few = moe_tune.candidates(128, 128, True)  # one row per expert: 16-row tiles only
    assert few and {c[0] for c in few} == {16}
    many = moe_tune.candidates(65536, 128, True)  # 512 rows per expert: large tiles
    assert {c[0] for c in many} == {64, 128}
    for gated, configs in ((True, few + many), (False, moe_tune.candidates(65536, 128, False))):
        for bm, bn, bk, warps, stages in configs:
            assert stages * (bm * bk + (1 + gated) * bk * bn) * 2 <= moe_tune.SMEM_BYTES
            assert warps == 4 or bm * bn >= 64 * 128


@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU interpreter's run")
def test_smoke_run_writes_report_and_merges_table(tmp_path: Path) -> None:
    key_kept = "bfloat16 E=1 H=1 I=1"
    (tmp_path / "cpu.json").write_text(json.dumps(
        {"tables": {key_kept: {"64": {"gate_up": GATE, "down": DOWN}}}}))
    out = tmp_path / "tune.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_tune.py"), "--smoke",
                           "--out", str(out), "--table-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (key, entries), = report["tables"].items()
    entry = entries["120"]  # 40 tokens x top-3
    assert entry["gate_up"][0] == entry["down"][0]
    assert entry["tuned_rel_err"] < 1e-5 and entry["us"] > 0
    assert all("us" in r or "error" in r for r in report["rows"])
    moe_tuned.load_table.cache_clear()
    tables = moe_tuned.load_table(tmp_path / "cpu.json")
    assert set(tables) == {key_kept, key}  # merged: the other shape kept


@pytest.mark.parametrize("rule", ["heuristic", "torch_align_heuristic"])
def test_moe_rule_swaps_the_grouped_path(monkeypatch: pytest.MonkeyPatch, rule: str) -> None:
    """``benchmarks/moe_rule.py``: the table lookup off (and the torch alignment back), the
    headline run tagged with the rule; an unknown rule refused."""
    import moe_rule

    from heteroserve.platforms.triton import moe, moe_align

    for name in ("tuned_configs", "align_pairs"):  # restored after the test
        monkeypatch.setattr(moe, name, getattr(moe, name))
    seen = []
    monkeypatch.setattr(moe_rule.bench_headline, "main_tagged",
                        lambda argv, tags: seen.append((argv, tags)) or 0)
    monkeypatch.setattr(sys, "argv", ["moe_rule.py", rule, "--out", "x.json"])
    assert moe_rule.main() == 0
    assert seen == [(["--out", "x.json"], {"moe_rule": rule})]
    assert moe.tuned_configs(4096, torch.bfloat16, 128, 2048, 768, torch.device("cuda")) is None
    want = moe_align.align_pairs_torch if rule == "torch_align_heuristic" else \
        moe_align.align_pairs
    assert moe.align_pairs is want
    monkeypatch.setattr(sys, "argv", ["moe_rule.py", "nope"])
    with pytest.raises(SystemExit, match="unknown rule"):
        moe_rule.main()


def test_shape_argument() -> None:
    shape = moe_tune.parse_shape("256,7168,256,8")
    assert (shape.experts, shape.hidden, shape.inter, shape.top_k) == (256, 7168, 256, 8)
    with pytest.raises(SystemExit, match="E,H,I,K"):
        moe_tune.parse_shape("256,7168")


def test_describe_names_the_table_or_the_heuristic(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """The Triton fused MoE's ``describe_experts``: the table file and its pair counts where
    the experts' shape is tuned on this device, else the heuristic and how to tune."""
    from heteroserve.core.kernels.ops import MOE_DESCRIBE_ATTR
    from heteroserve.platforms.triton.moe import describe_experts, fused_moe

    assert getattr(fused_moe, MOE_DESCRIBE_ATTR) is describe_experts
    key = moe_tuned.shape_key(torch.bfloat16, 4, 64, 32)
    _write(tmp_path / "Fake_GPU.json", {key: {"128": {"gate_up": GATE, "down": DOWN},
                                              "4096": {"gate_up": BIG_GATE, "down": BIG_DOWN}}})
    monkeypatch.setattr(moe_tuned, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(moe_tuned, "device_name", lambda device: "Fake GPU")
    w13 = torch.empty(4, 64, 64, dtype=torch.bfloat16, device="meta")
    w2 = torch.empty(4, 64, 32, dtype=torch.bfloat16, device="meta")
    assert describe_experts(w13, w2) == moe_tuned.describe(w13, w2) == (
        "grouped GEMM tiles: tuned for Fake GPU, bfloat16 E=4 H=64 I=32, 2 pair counts "
        "128-4096 (moe_tuned/Fake_GPU.json)")
    # w4a16 experts (int32 words) name their own paths
    assert describe_experts(torch.empty(4, 64, 8, dtype=torch.int32, device="meta"),
                            torch.empty(4, 64, 4, dtype=torch.int32, device="meta")) == (
        "w4a16 experts: 4-bit decode kernels up to 64 (token, expert) pairs; beyond, "
        "the grouped GEMM dequantizing each tile in registers")
    assert moe_tuned.describe(w13.to(torch.float8_e4m3fn), w2).startswith(
        "grouped GEMM tiles: heuristic (no table for float8_e4m3fn E=4 H=64 I=32 in "
        "moe_tuned/Fake_GPU.json; benchmarks/moe_tune.py writes one)")
    assert "interpreter" in moe_tuned.describe(torch.empty(4, 64, 64), torch.empty(4, 64, 32))


def test_startup_block_carries_the_fused_moe_note(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """A ``fused_moe`` with ``describe_experts`` gets one start-up line per distinct note
    (every layer of a tiny Qwen3-MoE says the same); one without says nothing."""
    from engine_harness import cpu_args
    from heteroserve.core.kernels.ops import MOE_DESCRIBE_ATTR
    from heteroserve.core.model_runner.build import build_model_runner, startup_block
    from heteroserve.core.models.tiny import build_tiny_model
    from heteroserve.core.plugins.manager import load_plugins

    path = build_tiny_model(tmp_path / "moe", "qwen3_moe", seed=2)
    runner = build_model_runner(cpu_args(path))[2]
    assert runner.model.startup_notes() == []
    impl = runner.dispatch.fused_moe
    monkeypatch.setattr(impl, MOE_DESCRIBE_ATTR,
                        lambda w13, w2: f"{w13.shape[0]} experts, fake tiles", raising=False)
    block = startup_block(runner.platform, load_plugins(), runner.dispatch, runner)
    experts = runner.model.model.layers[0].mlp.w13.shape[0]
    assert block.count(f"model path   fused_moe: {experts} experts, fake tiles") == 1, block


@pytest.mark.parametrize("fold", [8, 16])
def test_moe_rule_decode_fold(monkeypatch: pytest.MonkeyPatch, fold: int) -> None:
    """``moe_rule.py decode_fold8/16``: both decode kernels' tiles get the fold, nothing else
    in them changes, and the grouped path keeps its table."""
    import moe_rule

    from heteroserve.platforms.triton import moe, moe_decode

    monkeypatch.setattr(moe_decode, "choose_config", moe_decode.choose_config)
    monkeypatch.setattr(moe, "tuned_configs", moe.tuned_configs)
    before = moe_decode.choose_config(1, 8, 2048, 768, torch.bfloat16, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(moe_rule.bench_headline, "main_tagged",
                        lambda argv, tags: seen.append((argv, tags)) or 0)
    monkeypatch.setattr(sys, "argv", ["moe_rule.py", f"decode_fold{fold}", "--out", "x.json"])
    assert moe_rule.main() == 0
    assert seen == [(["--out", "x.json"], {"moe_rule": f"decode_fold{fold}"})]
    after = moe_decode.choose_config(1, 8, 2048, 768, torch.bfloat16, torch.device("cpu"))
    assert after == moe_decode.DecodeConfig(replace(before.gate_up, fold=fold),
                                            replace(before.down, fold=fold))
    assert moe.tuned_configs is not moe_rule._no_table
