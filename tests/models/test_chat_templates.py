"""Each family's chat template through ``/v1/chat/completions`` of ``heteroserve serve``:
the prompt is the tokenizer's own rendering of the messages, and the greedy reply is what
transformers generates from it."""

from __future__ import annotations

import httpx
import pytest
import torch
import transformers
from server_harness import MODEL_NAME, ServerProcess

from heteroserve.core.models.tiny import build_tiny_model

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Spain?"}]
MARKERS = {"gemma3": "<start_of_turn>model\n", "deepseek_v3": "<｜Assistant｜>"}


@pytest.mark.parametrize("arch", sorted(MARKERS))
def test_chat_completion_uses_the_family_template(arch: str, tmp_path) -> None:
    path = build_tiny_model(tmp_path / arch, arch, seed=5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith(MARKERS[arch]) and "system" not in text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)[0, len(ids):].tolist()
    server = ServerProcess(path, tmp_path / "server.log", "--dtype", "float32")
    try:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60.0, trust_env=False,
                           json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 6,
                                 "temperature": 0.0, "ignore_eos": True}).json()
    finally:
        assert server.stop() == 0, server.log()
    assert reply["usage"]["prompt_tokens"] == len(ids), reply
    assert reply["choices"][0]["message"]["content"] == tokenizer.decode(ref), reply
