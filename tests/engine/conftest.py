"""Fixtures for the engine runtime tests: one tiny random-weight Llama per session and the
transformers reference model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama with its tokenizer (built once per session)."""
    from heteroserve.core.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("engine-model"), "llama")


@pytest.fixture(scope="session")
def hf_model(tiny_model: Path):
    """The same model in transformers (fp32, eval), the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def engine_kwargs() -> dict:
    """Engine arguments for the tests: cpu, fp32, a small KV pool."""
    return dict(platform="cpu", dtype="float32", max_total_tokens=8192, log_level="warning")
