"""Fixtures for the HTTP server tests: a tiny random-weight model, the session's shared
``heteroserve serve`` process (API key :data:`server_harness.API_KEY`), clients, and the
transformers reference. Helpers live in ``tests/support/server_harness.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from server_harness import API_KEY, ServerProcess


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Llama with its tokenizer (built once per session)."""
    from heteroserve.core.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("server-model"), "llama")


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server (API key :data:`API_KEY`), stopped at the end of the session."""
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    proc = ServerProcess(tiny_model, log, "--api-key", API_KEY)
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log()}"


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """An httpx client on the shared server that sends the API key."""
    with httpx.Client(base_url=server.url, timeout=60.0, trust_env=False,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    """The tiny model's tokenizer (heteroserve's wrapper)."""
    from heteroserve.core.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def hf_greedy(tiny_model: Path):
    """``hf_greedy(ids, n) -> list[int]``: the next ``n`` greedy tokens from transformers'
    own implementation of the tiny model (the independent reference), EOS not stopping."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()

    def greedy(ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([seq])).logits[0, -1]
                seq.append(int(torch.argmax(logits)))
        return seq[len(ids):]

    return greedy

