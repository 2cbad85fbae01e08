"""``benchmarks/moe_decode_sweep.py`` on CPU: its routing, byte count, float64 reference and
launch-shape neighbours; its sweep's skipped and rejected rows; and the ``--smoke`` run end
to end (Triton interpreter, tiny shape) writing the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heteroserve.conformance.oracles import moe as oracle
from heteroserve.platforms.triton.moe_decode import DecodeConfig, DecodeTile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import moe_decode_sweep as bench  # noqa: E402

TINY = bench.MoEShape("tiny", 32, 24, 6, 3)


def test_routing_and_routed_bytes() -> None:
    tw, ids = bench.routing(4, 5, TINY, torch.Generator().manual_seed(0))
    assert ids.shape == tw.shape == (4, 5, 3) and ids.dtype == torch.int32
    assert all(len(set(tok.tolist())) == 3 for call in ids for tok in call)  # distinct per token
    assert torch.allclose(tw.sum(-1), torch.ones(4, 5))
    ids = torch.tensor([[[0, 1], [1, 2]], [[3, 4], [5, 0]]])
    assert bench.routed_bytes(ids, 10) == (3 + 4) / 2 * 10  # distinct experts, mean over calls
    assert TINY.expert_bytes(2) == 3 * 32 * 24 * 2


def test_reference_is_the_conformance_oracle() -> None:
    g = torch.Generator().manual_seed(1)
    x, w13, w2 = torch.randn(3, 32, generator=g), torch.randn(6, 48, 32, generator=g), \
        torch.randn(6, 32, 24, generator=g)
    tw, ids = bench.routing(1, 3, TINY, g)
    ref = bench.reference(x, w13, w2, tw[0], ids[0])
    assert torch.allclose(ref, oracle.fused_moe(x, w13, w2, tw[0], ids[0]), rtol=1e-12)
    assert bench.rel_err(ref.float(), ref) < 1e-6


def test_neighbours_change_one_kernel_one_knob() -> None:
    default = DecodeConfig(DecodeTile(8, 512), DecodeTile(1, 256))
    configs = bench.sweep_configs(default)
    assert configs[0] == default and len(set(configs)) == len(configs) == 12  # down n/2 is n
    for cfg in configs[1:]:
        changed = [t for t, d in ((cfg.gate_up, default.gate_up), (cfg.down, default.down))
                   if t != d]
        assert len(changed) == 1


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="runs interpreted kernels on CPU tensors; this session compiles them")
def test_sweep_rows_for_rejected_and_out_of_budget_shapes() -> None:
    bad = DecodeConfig(DecodeTile(3, 32, 1), DecodeTile(8, 32, 1))  # 3: no power of two
    report = bench.run([TINY], (1,), (1,), 1, torch.device("cpu"), 1 << 16, 1e9,
                       lambda default: [bad])
    (row,) = report["sweep"]
    assert "error" in row and row["config"]["gate_up"]["block_n"] == 3
    report = bench.run([TINY], (1,), (1,), 1, torch.device("cpu"), 1 << 16, 0.0)
    assert report["sweep"] and all(r["skipped"] == "time budget" for r in report["sweep"])
    paths = {r["path"]: r for r in report["rows"]}
    assert paths["decode"]["fused_moe_takes"] and not paths["grouped"]["fused_moe_takes"]
    assert max(r["rel_err"] for r in report["rows"]) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="--smoke is the CPU interpreter's run")
def test_smoke_run_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_decode_sweep.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["path"] for r in report["rows"]} == {"grouped", "decode"}
    assert all(r["rel_err"] < 1e-5 and r["us"] > 0 and 0 < r["fraction_of_copy"]
               for r in report["rows"])
    timed = [s for s in report["sweep"] if "us" in s]
    assert len(timed) == 2 and timed[0]["default"] and all(s["rel_err"] < 1e-5 for s in timed)
    assert "best decode shape smoke T=2" in proc.stdout
