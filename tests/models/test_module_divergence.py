"""``tests/support/module_divergence.py``: the per-module comparison that bisects a parity
failure seen on one platform only."""

from __future__ import annotations

import pytest
import torch

from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.models.tiny import build_tiny_model
from engine_harness import cpu_args
from module_divergence import departures, module_outputs
from parity import PROMPT


def test_departures_lists_modules_past_the_tolerance_and_stops_at_a_mismatch() -> None:
    a = [("x", torch.ones(3)), ("y", torch.ones(3)), ("z", torch.ones(2))]
    b = [("x", torch.ones(3)), ("y", torch.tensor([1.0, 1.5, 1.0])), ("w", torch.ones(2))]
    assert departures(a, b, 1e-4) == [("y", pytest.approx(1 / 3))]


def test_a_perturbed_layer_is_the_first_departure(tmp_path) -> None:
    path = build_tiny_model(tmp_path / "m", "llama", seed=2)
    runs = []
    for perturb in (False, True):
        runner = build_model_runner(cpu_args(path))[2]
        if perturb:
            with torch.no_grad():
                runner.model.model.layers[1].self_attn.o_proj.weight.mul_(1.01)
        runs.append(module_outputs(runner, PROMPT))
    (logits_a, rec_a), (logits_b, rec_b) = runs
    assert len(rec_a) == len(rec_b) > 10 and not torch.equal(logits_a, logits_b)
    found = departures(rec_a, rec_b, 1e-4)
    assert found and found[0][0] == "model.layers.1.self_attn.o_proj", found[:3]
    assert departures(rec_a, rec_a, 0.0) == []
