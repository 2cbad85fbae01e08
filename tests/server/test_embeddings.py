"""``POST /v1/embeddings`` against ``heteroserve serve``: last-token and mean pooling of the
final hidden states match transformers' own model (``last_hidden_state``, after the final
norm) within 1e-4; strings, token ids and batches; base64 and the openai client; usage;
embeddings running next to generation; bad inputs answered with 400.
"""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from server_harness import API_KEY, MODEL_NAME, ServerProcess

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world!",
         "Attention reads keys and values from a paged cache, one page at a time."]
IDS = [[5, 17, 99, 3, 250, 41, 7], [12, 13], list(range(60, 100))]
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_embed(tiny_model):
    """``hf_embed(ids, pooling, normalize) -> tensor [H]`` from transformers' base model."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_model), dtype=torch.float32).eval()

    def embed(ids: list[int], pooling: str = "last", normalize: bool = True) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0].double()
        vec = hidden[-1] if pooling == "last" else hidden.mean(0)
        return torch.nn.functional.normalize(vec, dim=0) if normalize else vec

    return embed


def _post(http: httpx.Client, body: dict) -> httpx.Response:
    return http.post("/v1/embeddings", json={"model": MODEL_NAME, **body})


def _vectors(resp: httpx.Response) -> list[torch.Tensor]:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    assert all(d["object"] == "embedding" for d in data)
    return [torch.tensor(d["embedding"], dtype=torch.float64) for d in data]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOL


def test_last_pooling_of_strings_matches_transformers(http, tokenizer, hf_embed) -> None:
    resp = _post(http, {"input": TEXTS})
    body = resp.json()
    ids = [tokenizer.encode(t) for t in TEXTS]
    for got, x in zip(_vectors(resp), ids):
        _close(got, hf_embed(x, "last"))
        assert abs(got.norm().item() - 1.0) < 1e-5
    assert body["object"] == "list" and body["model"] == MODEL_NAME
    n = sum(len(x) for x in ids)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}


def test_mean_pooling_of_token_ids_matches_transformers(http, hf_embed) -> None:
    resp = _post(http, {"input": IDS, "pooling": "mean"})
    for got, x in zip(_vectors(resp), IDS):
        _close(got, hf_embed(x, "mean"))
    single = _vectors(_post(http, {"input": IDS[0], "pooling": "mean"}))
    assert len(single) == 1
    _close(single[0], hf_embed(IDS[0], "mean"))
    assert _post(http, {"input": IDS[0]}).json()["usage"]["prompt_tokens"] == len(IDS[0])


def test_repeated_input_reuses_nothing_wrong(http, hf_embed) -> None:
    """The same prompt again (its KV now in the prefix cache) embeds the same, both ways."""
    for pooling in ("last", "mean"):
        for _ in range(2):
            got = _vectors(_post(http, {"input": [IDS[2]], "pooling": pooling}))[0]
            _close(got, hf_embed(IDS[2], pooling))


def test_unnormalized_and_base64(http, hf_embed) -> None:
    resp = _post(http, {"input": IDS[:2], "normalize": False, "encoding_format": "base64"})
    assert resp.status_code == 200, resp.text
    for item, x in zip(resp.json()["data"], IDS):
        raw = base64.b64decode(item["embedding"])
        got = torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw), dtype=torch.float64)
        _close(got, hf_embed(x, "last", normalize=False))


def test_openai_client(server, tokenizer, hf_embed) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=60.0, http_client=httpx.Client(trust_env=False))
    with client:
        out = client.embeddings.create(model=MODEL_NAME, input=TEXTS[:2])  # base64 on the wire
        as_float = client.embeddings.create(model=MODEL_NAME, input=IDS[1],
                                            encoding_format="float")
    for item, text in zip(out.data, TEXTS[:2]):
        _close(torch.tensor(item.embedding, dtype=torch.float64),
               hf_embed(tokenizer.encode(text), "last"))
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS[:2])
    _close(torch.tensor(as_float.data[0].embedding, dtype=torch.float64), hf_embed(IDS[1]))


def test_embeddings_next_to_generation(http, tokenizer, hf_greedy, hf_embed) -> None:
    prompts = ["Once upon a time", "Numbers: 1 2 3", "def main():", "The sun rises"]

    def generate(prompt: str) -> str:
        resp = http.post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 10, "temperature": 0.0,
            "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"]

    def embed(i: int) -> list[torch.Tensor]:
        return _vectors(_post(http, {"input": IDS, "pooling": ("last", "mean")[i % 2]}))

    with ThreadPoolExecutor(8) as pool:
        texts = pool.map(generate, prompts)
        vectors = pool.map(embed, range(4))
        texts, vectors = list(texts), list(vectors)
    for prompt, text in zip(prompts, texts):
        assert text == tokenizer.decode(hf_greedy(tokenizer.encode(prompt), 10))
    for i, got in enumerate(vectors):
        for vec, x in zip(got, IDS):
            _close(vec, hf_embed(x, ("last", "mean")[i % 2]))


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": [1.5, 2]}, "input"),
    ({"input": [True]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": [3] * 5000}, "input"),
    ({"input": ["a"] * 2049}, "input"),
    ({"input": [[10**9]]}, "input_ids"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "a", "pooling": "cls"}, "pooling"),
    ({"input": "a", "dimensions": 7}, "dimensions"),
    ({"input": "a", "normalize": "yes"}, "normalize"),
])
def test_bad_input_is_400(http, body, param) -> None:
    resp = _post(http, body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


def test_unknown_model_is_404_and_server_survives(http, hf_embed) -> None:
    resp = http.post("/v1/embeddings", json={"model": "nope", "input": "a"})
    assert resp.status_code == 404
    _close(_vectors(_post(http, {"input": IDS[0]}))[0], hf_embed(IDS[0]))


def test_server_flags_pooling_and_chunked_prefill(tiny_model, tmp_path, hf_embed) -> None:
    """``--embedding-pooling mean --disable-embedding-normalize``, prompts longer than the
    chunked-prefill size (pooled over several steps), ``dimensions`` equal to the hidden
    size."""
    proc = ServerProcess(tiny_model, tmp_path / "server.log", "--embedding-pooling", "mean",
                         "--disable-embedding-normalize", "--chunked-prefill-size", "16")
    try:
        with httpx.Client(base_url=proc.url, timeout=60.0, trust_env=False) as http:
            long_ids = [list(range(200, 250)), list(range(300, 337))]
            resp = _post(http, {"input": long_ids, "dimensions": 128})
            for got, x in zip(_vectors(resp), long_ids):
                _close(got, hf_embed(x, "mean", normalize=False))
            resp = _post(http, {"input": long_ids, "pooling": "last", "normalize": True})
            for got, x in zip(_vectors(resp), long_ids):
                _close(got, hf_embed(x, "last"))
    finally:
        assert proc.stop() == 0, proc.log()
