"""SGLang's native ``/generate`` and the operational routes: ``/health``,
``/health_generate``, ``/openapi.json``, ``/get_model_info``, ``/get_server_info``
(``/metrics``: test_metrics.py)."""

from __future__ import annotations

import json

from platform_under_test import TEST_PLATFORM
from server_harness import API_KEY, MODEL_NAME

PROMPT_IDS = [5, 17, 42, 99, 7]


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of a server-sent-event body, in order."""
    events = [block for block in text.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def test_generate_input_ids_matches_transformers(http, hf_greedy, tokenizer) -> None:
    resp = http.post("/generate", json={
        "input_ids": PROMPT_IDS,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["output_ids"] == hf_greedy(PROMPT_IDS, 8)
    assert out["text"] == tokenizer.decode(out["output_ids"])
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 8
    assert meta["finish_reason"]["type"] == "length"


def test_generate_text_stream_and_logprobs(http) -> None:
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = http.post("/generate", json={"text": "Hello", "sampling_params": params,
                                         "return_logprob": True, "top_logprobs_num": 2}).json()
    lps = plain["meta_info"]["output_token_logprobs"]
    assert [tid for _, tid, _ in lps] == plain["output_ids"]
    assert all(len(top) == 2 for top in plain["meta_info"]["output_top_logprobs"])
    resp = http.post("/generate", json={"text": "Hello", "sampling_params": params,
                                        "stream": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
    assert chunks[-1]["text"] == plain["text"]
    assert chunks[-1]["output_ids"] == plain["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_generate_batch_and_n(http) -> None:
    params = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    single = [http.post("/generate", json={"text": t, "sampling_params": params}).json()
              for t in ("a b", "c d")]
    batch = http.post("/generate", json={"text": ["a b", "c d"],
                                         "sampling_params": {**params, "n": 2}}).json()
    assert isinstance(batch, list) and len(batch) == 4
    assert [o["text"] for o in batch] == [single[0]["text"]] * 2 + [single[1]["text"]] * 2


def test_health_routes(http) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200


def test_model_and_server_info(http) -> None:
    info = http.get("/get_model_info").json()
    assert info["served_model_name"] == MODEL_NAME and info["is_generation"] is True
    server_info = http.get("/get_server_info").json()
    assert "api_key" not in server_info and API_KEY not in json.dumps(server_info)
    assert server_info["engine"]["platform"] == TEST_PLATFORM
    assert server_info["engine"]["max_context_len"] == 2048
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL_NAME
    assert http.get(f"/v1/models/{MODEL_NAME}").json()["max_model_len"] == 2048


def test_openapi_schema(http) -> None:
    schema = http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/generate",
                 "/health", "/health_generate", "/metrics"):
        assert path in schema["paths"], path
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
