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
