"""Tensor parallelism on the CPU with gloo: two ranks give the same greedy output as one,
and a dying rank is reported instead of hanging the engine."""

from __future__ import annotations

import time

import pytest

import heteroserve
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.runtime.errors import EngineDeadError
from platform_under_test import TEST_PLATFORM

PLATFORM = TEST_PLATFORM  # cuda on a 2-GPU machine: NCCL
PROMPTS = ["Hello world", "The quick brown fox jumps", "1 2 3"]
SAMPLING = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}


def _generate(path, tp: int) -> list[list[int]]:
    engine = heteroserve.Engine(model_path=str(path), platform=PLATFORM, dtype="float32",
                                max_total_tokens=4096, tp_size=tp)
    try:
        return [r["output_ids"] for r in engine.generate(PROMPTS, SAMPLING)]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3", "deepseek_v2"])
def test_tp2_equals_tp1(tmp_path, arch: str) -> None:
    """DeepSeek: shared experts fused (split by tp as the routed ones); V3's q_a and kv_a
    merged, V2's column-parallel q_proj kept apart from kv_a at tp 2."""
    path = build_tiny_model(tmp_path / arch, arch, seed=9)
    assert _generate(path, 2) == _generate(path, 1)


def test_dead_rank_is_reported_not_hung(tmp_path) -> None:
    path = build_tiny_model(tmp_path / "m", "llama", seed=9)
    engine = heteroserve.Engine(model_path=str(path), platform=PLATFORM, dtype="float32",
                                max_total_tokens=4096, tp_size=2)
    try:
        engine.client.supervisor.procs[1].kill()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="scheduler"):
            for _ in range(40):  # the watchdog notices within a second or two
                engine.generate("hi", {"max_new_tokens": 4})
                time.sleep(0.1)
        assert time.monotonic() - start < 20
        for p in engine.client.supervisor.procs:
            assert p.wait(10) is not None
    finally:
        engine.shutdown()
