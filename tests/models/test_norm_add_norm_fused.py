"""Gemma 2 and Gemma 3 run each post-norm fused with the pre-norm after it: two
``norm_add_norm`` calls a layer (the second ends with the next layer's input norm, or the
final norm), one plain ``rms_norm`` for the first layer's input and no ``fused_add_rms_norm``."""

from __future__ import annotations

from collections import Counter

import pytest

from heteroserve.conformance.bisect import trace_prefill
from heteroserve.core.kernels import ops
from heteroserve.core.models.tiny import build_tiny_model


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_two_fused_norm_calls_a_layer(tmp_path, arch: str) -> None:
    path = build_tiny_model(tmp_path / arch, arch, seed=3)
    trace = trace_prefill(str(path), "cpu", "float32", {})
    layers = 1 + max(c.layer for c in trace.calls)
    assert layers >= 2
    for i in range(layers):
        counts = Counter(c.op for c in trace.calls if c.layer == i)
        assert counts[ops.NORM_ADD_NORM] == 2, (arch, i, counts)
        assert counts[ops.RMS_NORM] == counts[ops.FUSED_ADD_RMS_NORM] == 0, (arch, i, counts)
    everywhere = Counter(c.op for c in trace.calls)
    assert everywhere[ops.RMS_NORM] == 1 and everywhere[ops.FUSED_ADD_RMS_NORM] == 0
    assert trace.chosen[ops.NORM_ADD_NORM] == "torch_native"
