"""The metrics table: names valid and unique under every prefix, buckets sorted."""

from __future__ import annotations

import re

from heteroserve.server.metrics_table import COMPAT, METRICS, Kind, token_buckets

NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_names_are_valid_and_unique_per_engine() -> None:
    ours = [s.name for s in METRICS]
    assert len(set(ours)) == len(ours)
    for flavour in COMPAT:
        names = [n for s in METRICS for n in s.compat_names(flavour)]
        assert len(set(names)) == len(names), flavour
        assert all(NAME.match(f"{flavour}:{n}") and not n.endswith("_total") for n in names)
    assert all(NAME.match(f"heteroserve:{n}") for n in ours)


def test_buckets() -> None:
    for spec in METRICS:
        if spec.kind is Kind.HISTOGRAM and spec.buckets is not None:
            assert list(spec.buckets) == sorted(set(spec.buckets)), spec.name
        if spec.kind is not Kind.HISTOGRAM:
            assert spec.buckets == (), spec.name
    assert token_buckets(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert token_buckets(0) == (1.0,)


def test_docs_list_every_metric() -> None:
    """docs/server.md's metrics table names every series under every prefix."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "server.md").read_text()
    for spec in METRICS:
        suffix = "_total" if spec.kind is Kind.COUNTER else ""
        for prefix, names in (("heteroserve", (spec.name,)), ("vllm", spec.vllm),
                              ("sglang", spec.sglang)):
            for name in names:
                assert f"`{prefix}:{name}{suffix}`" in doc, (prefix, name)


def test_fresh_exposition_has_every_series() -> None:
    """Before any request, every family of the table (ours and the compat engine's) exists
    with its labels, so dashboards and alerts see zeros rather than no data."""
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from heteroserve.server.metrics import ServerMetrics

    idle = SimpleNamespace(get_stats=dict, is_alive=lambda: True)
    for flavour in COMPAT:
        text = ServerMetrics(idle, "m", 4096, flavour).render().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for spec in METRICS:
            for name in (f"heteroserve:{spec.name}",
                         *(f"{flavour}:{n}" for n in spec.compat_names(flavour))):
                family = families[name]
                assert family.type == spec.kind.value and family.samples, name
                assert all(s.labels["model_name"] == "m" for s in family.samples), name
        other = "sglang" if flavour == "vllm" else "vllm"
        assert not [n for n in families if n.startswith(other + ":")]
