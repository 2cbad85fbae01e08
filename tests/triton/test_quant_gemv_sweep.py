"""``benchmarks/quant_gemv_sweep.py --smoke``: runs on the CPU under the Triton interpreter,
checks the new (GEMV) path of each scheme against the float64 oracle and writes the JSON the
GPU run writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="--smoke interprets kernels that this session has compiled")
def test_smoke_run_writes_rows_for_old_and_new_paths(tmp_path: Path) -> None:
    import quant_gemv_sweep

    out = tmp_path / "q.json"
    schemes = ("fp8_block", "int8_w8a8", "gptq_w4a16")
    assert quant_gemv_sweep.main(["--smoke", "--out", str(out),
                                  "--schemes", ",".join(schemes)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["scheme"], r["path"]) for r in rows} == {(s, p) for s in schemes
                                                      for p in ("old", "new")}
    for row in rows:
        assert row["us"] > 0 and row["weight_bytes"] > 0 and row["frac_copy"] > 0
        if row["path"] == "new":
            assert row["rel_err_vs_oracle"] < 2e-2
    fp8 = next(r for r in rows if r["scheme"] == "fp8_block")
    assert fp8["weight_bytes"] == 200 * 384 + 2 * 3 * 4  # fp8 bytes + 2x3 fp32 block scales
