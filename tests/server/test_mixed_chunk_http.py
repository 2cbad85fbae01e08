"""``heteroserve serve --enable-mixed-chunk`` behind the official ``openai`` client: concurrent
greedy completions of different prompt lengths (8-token chunks and three running requests, so
decodes ride along in prefill steps) each equal transformers' own greedy tokens, streamed or
not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_harness import MODEL_NAME, ServerProcess

WORDS = "the quick brown fox jumps over the lazy dog while seven small birds sing".split()
PROMPTS = [" ".join(WORDS[: 2 + 3 * i]) for i in range(5)]


@pytest.fixture(scope="module")
def mixed_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("mixed-log") / "server.log"
    proc = ServerProcess(tiny_model, log, "--enable-mixed-chunk", "--chunked-prefill-size",
                         "8", "--max-running-requests", "3")
    yield proc
    assert proc.stop() == 0, proc.log()


def test_concurrent_completions_match_transformers(mixed_server, tokenizer, hf_greedy) -> None:
    client = openai.OpenAI(base_url=mixed_server.url + "/v1", api_key="none", max_retries=0,
                           timeout=120.0, http_client=httpx.Client(trust_env=False))

    def complete(i: int) -> str:
        kw = dict(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=10, temperature=0.0,
                  extra_body={"ignore_eos": True})
        if i % 2:
            return "".join(c.choices[0].text for c in
                           client.completions.create(stream=True, **kw) if c.choices)
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(complete, range(len(PROMPTS))))
    client.close()
    for prompt, text in zip(PROMPTS, texts):
        assert text == tokenizer.decode(hf_greedy(tokenizer.encode(prompt), 10)), prompt
