"""The committed cpu conformance report states its tier (issue 18: distributed + sampling)
and its provenance, and its digest matches its content."""

from __future__ import annotations

import json
from pathlib import Path

from heteroserve.conformance.provenance import verify_digest

REPORT = Path(__file__).resolve().parents[2] / "docs/conformance/conformance-cpu.json"


def test_committed_cpu_report_states_its_tier() -> None:
    doc = json.loads(REPORT.read_text())
    assert verify_digest(doc), "the committed report was edited after it was written"
    tiers = set(doc["tier_reached"].split("+"))
    assert {"correct", "distributed", "sampling"} <= tiers, doc["tier_reached"]
    assert doc["summary"]["failed"] == 0 and doc["selection"]["complete"]
    assert doc["provenance"]["heteroserve"]["git_sha"]
