"""Inputs that used to kill the engine or answer 500: each gets a 4xx OpenAI error (naming the
field where one is to blame) and the engine keeps serving everyone else, through HTTP on the
shared ``heteroserve serve`` process."""

from __future__ import annotations

import json

import httpx
import pytest
from server_harness import MODEL_NAME

COMPLETION = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4}


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert body["message"] and "\n" not in body["message"]
    assert "Traceback" not in body["message"] and "heteroserve." not in body["message"]
    return body


@pytest.mark.parametrize("extra, param", [
    ({"seed": 2 ** 63}, "seed"),
    ({"seed": 2 ** 70}, "seed"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"3": 1000}}, "logit_bias"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": [""]}, "stop"),
    ({"n": 0}, "n"),
    ({"stop_token_ids": [10 ** 9]}, "stop_token_ids"),
])
def test_bad_sampling_values_are_400_and_the_engine_lives(http: httpx.Client, extra: dict,
                                                          param: str) -> None:
    for stream in (False, True):
        err = _error(http.post("/v1/completions", json={**COMPLETION, **extra,
                                                        "stream": stream}), 400)
        assert err["param"] == param and err["type"] == "invalid_request_error"
    ok = http.post("/v1/completions", json={**COMPLETION, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_a_token_id_prompt_outside_the_vocabulary_is_named_prompt(http: httpx.Client) -> None:
    """The OpenAI route's field is ``prompt``, not the engine's ``input_ids``; ``/generate``
    keeps SGLang's name."""
    for prompt in ([5, 10 ** 7], [[5], [10 ** 7]]):
        err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 400)
        assert err["param"] == "prompt" and err["message"].startswith("prompt contains token id")
    err = _error(http.post("/generate", json={"input_ids": [10 ** 7]}), 400)
    assert err["param"] == "input_ids"


def test_non_finite_numbers_are_400(http: httpx.Client) -> None:
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"text": "hi", "sampling_params": {"temperature": %s}}' % value
        err = _error(http.post("/generate", content=body,
                               headers={"Content-Type": "application/json"}), 400)
        assert err["param"] == "temperature"
        body = json.dumps(COMPLETION)[:-1] + ', "top_p": %s}' % value
        _error(http.post("/v1/completions", content=body,
                         headers={"Content-Type": "application/json"}), 400)


def test_lone_surrogates_are_400(http: httpx.Client) -> None:
    raw = '{"model": "%s", "prompt": "ab\\ud800", "max_tokens": 2}' % MODEL_NAME
    err = _error(http.post("/v1/completions", content=raw,
                           headers={"Content-Type": "application/json"}), 400)
    assert "surrogate" in err["message"]
    raw = ('{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", '
           '"content": "x\\udfff"}]}' % MODEL_NAME)
    err = _error(http.post("/v1/chat/completions", content=raw,
                           headers={"Content-Type": "application/json"}), 400)
    assert "surrogate" in err["message"]


@pytest.mark.parametrize("kwargs", [{"messages": 5}, {"tokenize": True},
                                    {"add_generation_prompt": False}])
def test_reserved_chat_template_kwargs_are_400(http: httpx.Client, kwargs: dict) -> None:
    err = _error(http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "max_tokens": 2, "chat_template_kwargs": kwargs,
        "messages": [{"role": "user", "content": "hi"}]}), 400)
    assert err["param"] == "chat_template_kwargs"


def test_max_tokens_zero_generates_nothing(http: httpx.Client) -> None:
    out = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 0}).json()  # no EOS possible
    assert out["choices"][0]["text"] == "" and out["usage"]["completion_tokens"] == 0
    assert out["choices"][0]["finish_reason"] == "length"
    gen = http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 0}})
    assert gen.status_code == 200 and gen.json()["output_ids"] == []


def test_oversized_bodies_and_prompts(http: httpx.Client, server) -> None:
    huge = "a" * (33 * 1024 * 1024)
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": huge}), 413)
    assert err["code"] == "request_too_large"
    long_prompt = "word " * 200_000  # 1 MB: cannot fit a 2k-token context window
    err = _error(http.post("/v1/completions", json={**COMPLETION, "prompt": long_prompt}), 400)
    assert "context window" in err["message"]
    assert http.get("/health").status_code == 200


def test_client_rids_cannot_pose_as_health_checks(http: httpx.Client) -> None:
    """A client rid no longer skips anything: the same rid twice is refused like any other."""
    rid = "HEALTH_CHECK_mine"
    first = http.post("/generate", json={"text": "hi", "rid": rid,
                                         "sampling_params": {"max_new_tokens": 2}})
    assert first.status_code == 200 and first.json()["meta_info"]["id"] == rid
