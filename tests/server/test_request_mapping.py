"""Request fields -> engine sampling parameters, without a server: the OpenAI / vLLM / SGLang
spellings of sampling and structured-output fields, and their conflicts."""

from __future__ import annotations

import json

import pytest

import dataclasses

from heteroserve.core.scheduler.sampling_params import SamplingParams
from heteroserve.server.errors import APIError
from heteroserve.server.protocol import ChatCompletionRequest, CompletionRequest
from heteroserve.server.sampling import sampling_params

MSG = [{"role": "user", "content": "x"}]


def _set_fields(sp: SamplingParams) -> dict:
    """The fields of ``sp`` that differ from the defaults (what the request set)."""
    default = SamplingParams()
    return {f.name: getattr(sp, f.name) for f in dataclasses.fields(sp)
            if getattr(sp, f.name) != getattr(default, f.name)}


def test_openai_fields_map_to_sglang_names() -> None:
    req = CompletionRequest(prompt="x", n=2, temperature=0.5, top_p=0.9, top_k=0, min_p=0.1,
                            stop="END", seed=3, presence_penalty=0.1, frequency_penalty=0.2,
                            repetition_penalty=1.1, ignore_eos=True,
                            stop_token_ids=[7], max_tokens=9, min_tokens=4,
                            include_stop_str_in_output=True)
    assert _set_fields(sampling_params(req, req.max_tokens)) == {
        "max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9,  # top_k 0: off (-1)
        "min_p": 0.1, "stop": "END", "seed": 3, "presence_penalty": 0.1,
        "frequency_penalty": 0.2, "repetition_penalty": 1.1,
        "ignore_eos": True, "stop_token_ids": [7], "min_new_tokens": 4, "no_stop_trim": True}


def test_unset_fields_are_not_sent() -> None:
    assert _set_fields(sampling_params(ChatCompletionRequest(messages=MSG), None)) == {}


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("fields,expected", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     {"json_schema": json.dumps(SCHEMA)}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "text"}}, {}),
    ({"guided_json": SCHEMA}, {"json_schema": json.dumps(SCHEMA)}),
    ({"json_schema": json.dumps(SCHEMA)}, {"json_schema": json.dumps(SCHEMA)}),
    ({"guided_regex": "[a-z]+"}, {"regex": "[a-z]+"}),
    ({"regex": "[0-9]"}, {"regex": "[0-9]"}),
    ({"ebnf": 'root ::= "a"'}, {"ebnf": 'root ::= "a"'}),
    ({"guided_grammar": 'root ::= "b"'}, {"ebnf": 'root ::= "b"'}),
    ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     {"json_schema": json.dumps(SCHEMA)}),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, {"json_schema": json.dumps(SCHEMA)}),
    ({"structured_outputs": {"regex": "[0-9]"}}, {"regex": "[0-9]"}),
    ({"structured_outputs": {"choice": ["a", "b"]}}, {"choice": ["a", "b"]}),
    ({"structured_outputs": {"grammar": 'root ::= "c"'}}, {"ebnf": 'root ::= "c"'}),
    ({"structured_outputs": {"json_object": True}}, {"json_object": True}),
])
def test_structured_output_fields(fields, expected) -> None:
    params = sampling_params(ChatCompletionRequest(messages=MSG, **fields), None)
    assert _set_fields(params) == expected


@pytest.mark.parametrize("fields", [
    {"regex": "a", "guided_json": SCHEMA},
    {"response_format": {"type": "json_object"}, "ebnf": "root ::= x"},
    {"json_schema": "{not json"},
    {"guided_choice": []},
    {"structured_outputs": {"regex": "a"}, "guided_regex": "b"},
    {"structured_outputs": {"regex": "a", "json": SCHEMA}},
    {"structured_outputs": {"choice": []}},
    {"structured_outputs": {"regex": ""}},
    {"structured_outputs": {"whitespace_pattern": " "}},
    {"structured_outputs": {"disable_additional_properties": True}},
    {"regex": ""},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
])
def test_bad_or_conflicting_fields_are_400(fields) -> None:
    with pytest.raises(APIError) as info:
        sampling_params(ChatCompletionRequest(messages=MSG, **fields), None)
    assert info.value.status == 400
