"""Every error reply is an OpenAI error object with the right status, and no input harms the
engine: raw httpx against the shared server (which requires an API key)."""

from __future__ import annotations

import httpx
import pytest
from server_harness import API_KEY, MODEL_NAME

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "\n" not in err["message"]
    assert "Traceback" not in err["message"]
    if status < 500:
        assert err["type"] in ("invalid_request_error", "rate_limit_exceeded")
    if param is not None:
        assert err["param"] == param
    return err


@pytest.fixture()
def anon(server):
    with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as client:
        yield client


def test_api_key_required(anon) -> None:
    err = assert_error(anon.post("/v1/chat/completions", json=CHAT), 401)
    assert err["code"] == "invalid_api_key"
    assert_error(anon.post("/v1/completions", json=COMPLETION,
                           headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(anon.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}), 401)
    assert_error(anon.post("/generate", json={"text": "hi"}), 401)
    ok = anon.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    # probes stay open
    assert anon.get("/health").status_code == 200
    assert anon.get("/metrics").status_code == 200


def test_unknown_model_and_route(http) -> None:
    err = assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"}),
                       404, "model")
    assert err["code"] == "model_not_found"
    assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "nope"}), 404,
                 "model")
    assert_error(http.get("/v1/models/nope"), 404)
    assert_error(http.get("/v1/does-not-exist"), 404)


def test_malformed_json(http) -> None:
    headers = {"Content-Type": "application/json"}
    err = assert_error(http.post("/v1/chat/completions", content=b'{"messages": [', headers=headers),
                       400)
    assert err["code"] == "invalid_json"
    assert_error(http.post("/v1/completions", content=b"", headers=headers), 400)
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400)
    assert_error(http.post("/v1/completions", content=b"prompt=hi"), 400)


LONG = list(range(5, 105)) * 25  # 2500 tokens, beyond the 2048-token context window

BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes please"}, "stream"),
    ({"tool_choice": "required"}, "tool_choice"),
    # this server has no --tool-call-parser (tests/server/test_tool_calls_http.py has one)
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
     "tool_choice"),
    ({"regex": "a+", "json_schema": {"type": "object"}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, None),
    ({"max_tokens": 2040}, None),  # prompt + max_tokens beyond the context window
]

BAD_COMPLETION = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": LONG}, None),
    ({"prompt": [1_000_000]}, None),
    ({"prompt": [-1]}, None),
    ({"logprobs": 21}, "logprobs"),
    ({"echo": "x"}, "echo"),
    ({"suffix": "tail"}, "suffix"),
    ({"seed": "abc"}, "seed"),
    ({"min_p": 2}, "min_p"),
    ({"top_k": -7}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
]


@pytest.mark.parametrize("patch,param", BAD_CHAT, ids=[str(p) for p, _ in BAD_CHAT])
def test_bad_chat_request(http, patch, param) -> None:
    assert_error(http.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param)


@pytest.mark.parametrize("patch,param", BAD_COMPLETION,
                         ids=[str(p)[:40] for p, _ in BAD_COMPLETION])
def test_bad_completion_request(http, patch, param) -> None:
    assert_error(http.post("/v1/completions", json={**COMPLETION, **patch}), 400, param)


def test_bad_stream_request_is_plain_json_error(http) -> None:
    resp = http.post("/v1/completions", json={**COMPLETION, "stream": True, "prompt": LONG})
    assert resp.headers["content-type"].startswith("application/json")
    assert_error(resp, 400)


@pytest.mark.parametrize("body", [
    {}, {"text": "a", "input_ids": [1]}, {"text": []}, {"input_ids": []},
    {"text": "a", "sampling_params": {"no_such_param": 1}},
    {"text": "a", "sampling_params": {"temperature": -1}},
    {"text": "a", "sampling_params": {"max_new_tokens": -5}},
    {"text": ["a", "b"], "sampling_params": [{}]},
    {"text": "a", "sampling_params": {"n": 0}},
    {"text": "a", "top_logprobs_num": 99},
], ids=lambda b: str(b)[:50])
def test_bad_native_request(http, body) -> None:
    assert_error(http.post("/generate", json=body), 400)


def test_engine_survives_bad_input(server, http) -> None:
    pid = http.get("/get_server_info").json()["engine"]["pid"]
    for body in ({"input_ids": [0] * 3, "sampling_params": {"max_new_tokens": 1}},
                 {"text": "\x00\x01 \u200b \ufffd", "sampling_params": {
                     "max_new_tokens": 2, "stop": ["\x00"]}},
                 {"text": "x" * 3000, "sampling_params": {"max_new_tokens": 1}}):
        http.post("/generate", json=body)
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    out = http.post("/v1/completions", json=COMPLETION)
    assert out.status_code == 200, out.text
    assert http.get("/get_server_info").json()["engine"]["pid"] == pid
