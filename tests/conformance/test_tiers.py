"""Certification tiers: module mapping, per-tier status, and the tier a run reached."""

from __future__ import annotations

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


def test_digest_covers_everything_but_itself() -> None:
    doc = {"platform": "cpu", "table": [{"op": "rms_norm", "passed": 3}]}
    doc["digest"] = {"sha256": content_digest(doc)}
    assert verify_digest(doc)
    doc["table"][0]["passed"] = 4
    assert not verify_digest(doc)
