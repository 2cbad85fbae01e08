"""The optional ``performance`` tier: not run unless requested (so a default CPU run is
unchanged); when requested, every memory-bound op is timed against the measured copy
bandwidth, the report states each fraction, and an op below the required fraction fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heteroserve.conformance.context import ConformanceSetupError, open_context
from heteroserve.conformance.params import ConfParam
from heteroserve.conformance.performance import check_bandwidth, perf_cases
from heteroserve.conformance.tiers import Tier, tier_of
from heteroserve.core.kernels import ops

OPS = (ops.RMS_NORM, ops.FUSED_ADD_RMS_NORM, ops.SILU_AND_MUL, ops.GELU_AND_MUL)


def test_not_run_unless_requested() -> None:
    assert tier_of("test_performance") is Tier.PERFORMANCE
    ctx = open_context("cpu", quick=True)
    assert all(perf_cases(ctx, op) == [] for op in OPS)
    with pytest.raises(ConformanceSetupError, match=r"--conformance-performance 1.5: the "
                                                    r"fraction of the copy bandwidth must be"):
        open_context("cpu", quick=True, performance_fraction=1.5)


def test_an_op_below_the_fraction_fails_and_says_by_how_much() -> None:
    ctx = open_context("cpu", quick=True, performance_fraction=0.5)
    case = perf_cases(ctx, ops.RMS_NORM)[0]
    conf = ConfParam(ops.RMS_NORM, "tenfold", True, case)
    # an "rms_norm" that moves its bytes forty times over: a fortieth of the copy bandwidth,
    # far enough under the required half that a noisy machine cannot lift it past
    src = torch.ones(case.bytes_moved() // 8, dtype=torch.float32)
    dst = torch.empty_like(src)
    props: list = []
    with pytest.raises(AssertionError, match=r"rms_norm=tenfold moves .* GB/s, 0.\d\d of the "
                                             r"copy bandwidth .*asks for 0.50"):
        check_bandwidth(conf, ctx, props, lambda: [dst.copy_(src) for _ in range(40)])
    (key, m), = props
    assert key == "perf" and m["required"] == 0.5 and 0 < m["fraction"] < 0.5, m


def test_requested_tier_is_stated_in_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "heteroserve.conformance", "--platform",
         "cpu", "--conformance-quick", "--report", str(out), "-q", "-p", "no:cacheprovider",
         "-k", "bandwidth and torch_native", "--conformance-performance", "0.0001"],
        cwd=tmp_path, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "conformance-cpu.json").read_text())
    assert report["tiers"]["performance"]["status"] == "passed"
    perf = report["performance"]
    assert perf["required_fraction"] == 0.0001
    assert {m["op"] for m in perf["measurements"]} == set(OPS)
    for m in perf["measurements"]:
        assert m["fraction"] > 0 and m["copy_gb_per_s"] > 0 and m["gb_per_s"] > 0, m
    md = (out / "conformance-cpu.md").read_text()
    assert "## Performance" in md and "required fraction 0.0001" in md
