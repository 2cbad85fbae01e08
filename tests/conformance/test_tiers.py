"""Certification tiers: module mapping, per-tier status, and the tier a run reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from heteroserve.conformance.provenance import content_digest, verify_digest
from heteroserve.conformance.tiers import Tier, reached, summarize, tier_of


def test_modules_map_to_tiers() -> None:
    assert tier_of("test_norm") is Tier.CORRECT
    assert tier_of("test_graph_lengths") is Tier.GRAPH_SAFE
    assert tier_of("test_distributed") is Tier.DISTRIBUTED
    assert tier_of("test_sampling_stats") is Tier.SAMPLING


def test_reached_needs_correct_and_lists_passed_tiers_in_order() -> None:
    ok = summarize([("correct", "passed"), ("sampling", "passed"), ("distributed", "passed"),
                    ("graph-safe", "skipped")])
    assert ok["graph-safe"]["status"] == "skipped" and ok["performance"]["status"] == "not run"
    assert reached(ok) == ["correct", "distributed", "sampling"]
    broken = summarize([("correct", "passed"), ("correct", "failed"), ("sampling", "passed")])
    assert broken["correct"]["status"] == "failed" and reached(broken) == []


def test_a_skipped_world_size_leaves_distributed_incomplete() -> None:
    one_device = summarize([("correct", "passed"), ("distributed", "passed"),
                            ("distributed", "skipped")])
    assert one_device["distributed"]["status"] == "incomplete"
    assert reached(one_device) == ["correct"]
    skipped_norm = summarize([("correct", "passed"), ("correct", "skipped")])
    assert skipped_norm["correct"]["status"] == "passed"


def _run_with_plugin(tmp_path: Path, plugin: str, source: str,
                     command: list[str]) -> tuple[int, str, dict]:
    """Run ``command`` (the suite on cpu, writing ``tmp_path/report``) with the pytest
    plugin module ``plugin`` (``source``) importable; returns (exit code, log tail, report)."""
    (tmp_path / f"{plugin}.py").write_text(source)
    proc = subprocess.run([sys.executable, "-m", *command, "--report", str(tmp_path / "report"),
                           "-q", "--conformance-quick", "-p", plugin],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    report = json.loads((tmp_path / "report" / "conformance-cpu.json").read_text())
    return proc.returncode, proc.stdout[-2000:] + proc.stderr[-2000:], report


INTERRUPTER = '''
def pytest_runtest_teardown(item):
    if "rms_norm" in item.nodeid:
        raise KeyboardInterrupt
'''


def test_an_interrupted_run_claims_no_tier(tmp_path: Path) -> None:
    """A run cut by SIGINT (a time limit) after its first test reports that, not a tier."""
    _, log, report = _run_with_plugin(
        tmp_path, "interrupter", INTERRUPTER,
        ["pytest", "--pyargs", "heteroserve.conformance", "--platform", "cpu", "-p",
         "no:cacheprovider", "-k", "test_rms_norm and torch_native"])
    assert report["summary"]["passed"] >= 1, log
    assert report["tiers"]["correct"]["status"] == "passed", log
    assert report["selection"]["interrupted"] and not report["selection"]["complete"]
    assert report["tier_reached"] == "none"
    md = (tmp_path / "report" / "conformance-cpu.md").read_text()
    assert "(INCOMPLETE)" in md and "no tier is claimed" in md


SLEEPER = '''
import time
_hung = []
def pytest_runtest_call(item):
    if "rms_norm" in item.nodeid and not _hung:  # one hung case is enough
        _hung.append(item.nodeid)
        time.sleep(30)
'''


def test_a_hung_test_fails_by_the_test_timeout_and_the_run_completes(tmp_path: Path) -> None:
    """``heteroserve conformance --test-timeout``: a case that hangs is one failure with a
    reason in a complete report, not a run that never ends."""
    code, log, report = _run_with_plugin(
        tmp_path, "sleeper", SLEEPER,
        ["heteroserve.server.cli", "conformance", "--platform", "cpu", "--test-timeout", "8",
         "--", "-k", "test_rms_norm and torch_native and bf16"])
    assert code == 1, log
    assert report["selection"]["complete"] or report["selection"]["deselected"] > 0
    assert not report["selection"]["interrupted"]
    assert len(report["failures"]) == 1 and "Timeout" in report["failures"][0]["message"]
    assert report["summary"]["passed"] >= 1, log  # the cases after the hung one still ran


def test_digest_covers_everything_but_itself() -> None:
    doc = {"platform": "cpu", "table": [{"op": "rms_norm", "passed": 3}]}
    doc["digest"] = {"sha256": content_digest(doc)}
    assert verify_digest(doc)
    doc["table"][0]["passed"] = 4
    assert not verify_digest(doc)


def test_a_filtered_run_in_xdist_workers_is_partial(tmp_path: Path) -> None:
    """``-n 2 -k ...``: the workers deselect (the controller counts none), and the report
    still says the tier holds for the selected tests only."""
    proc = subprocess.run(
        [sys.executable, "-m", "heteroserve.server.cli", "conformance", "--platform", "cpu",
         "--report", str(tmp_path), "--", "-q", "--conformance-quick", "-p",
         "no:cacheprovider", "-n", "2", "-k", "test_rms_norm and torch_native and bf16"],
        capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "conformance-cpu.json").read_text())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["summary"]["passed"] >= 1
    assert report["selection"]["filters"] == {"keyword": "test_rms_norm and torch_native and bf16"}
    assert not report["selection"]["complete"]
    assert "(partial run: holds for the selected tests only)" in \
        (tmp_path / "conformance-cpu.md").read_text()
