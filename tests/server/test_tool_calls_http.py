"""Tool calling through the official ``openai`` client against ``heteroserve serve
--tool-call-parser hermes`` on the random-weight tiny model.

``tool_choice: required`` and a named function are enforced by the grammar engine, so even
random weights must return arguments that validate against the tool's JSON schema (checked
with ``jsonschema``), plain and streamed (the client's own delta accumulation). ``auto`` is
checked end to end by forcing the model's text into Hermes' format with a regex: the parser
must then turn it into ``tool_calls``. Bad ``tools`` / ``tool_choice`` are one-line 400s.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_harness import API_KEY, MODEL_NAME, ServerProcess

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "alerts": {"type": "boolean"},
    },
    "required": ["city", "days", "unit", "alerts"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]},
                   "hour24": {"type": "boolean"}},
    "required": ["zone", "hour24"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLING = {"max_tokens": 200, "temperature": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def tool_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("tool-server") / "server.log"
    proc = ServerProcess(tiny_model, log, "--api-key", API_KEY, "--tool-call-parser", "hermes")
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def oai(tool_server):
    client = openai.OpenAI(base_url=tool_server.url + "/v1", api_key=API_KEY, max_retries=0,
                           timeout=120.0, http_client=httpx.Client(trust_env=False))
    yield client
    client.close()


def _check_calls(message, names: set[str] | None = None) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream_final(oai, **kwargs):
    """The reply as the client's stream helper accumulates it from our deltas."""
    with oai.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        return stream.get_final_completion().choices[0]


def test_required_plain_and_streamed(oai) -> None:
    """Valid arguments; the client's stream helper accumulates our deltas into the same
    call the plain request returns (same seed)."""
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
                  parallel_tool_calls=False, **SAMPLING)
    plain = oai.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.content is None
    assert len(plain.message.tool_calls) == 1
    _check_calls(plain.message)
    final = _stream_final(oai, **kwargs)
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]


def test_named_plain_and_stream_deltas(oai) -> None:
    """A named function: its arguments, valid; streamed as one delta with index, id, type
    and name, then argument fragments that add up to the plain reply's arguments."""
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_time"}}, **SAMPLING)
    plain = oai.chat.completions.create(**kwargs).choices[0]
    assert [c.function.name for c in plain.message.tool_calls] == ["get_time"]
    _check_calls(plain.message)
    assert plain.finish_reason == "tool_calls"
    chunks = list(oai.chat.completions.create(stream=True, **kwargs))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_time"
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    args = first.function.arguments + "".join(d.function.arguments for d in rest)
    assert args == plain.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


class Place(BaseModel):
    country: Literal["FR", "JP"]
    city: Literal["Paris", "Tokyo"]


class Forecast(BaseModel):
    place: Place
    days: int = Field(ge=1, le=7)


def test_pydantic_function_tool_parse(oai) -> None:
    """``pydantic_function_tool`` (a schema with ``$defs``) and ``chat.completions.parse``:
    the client validates the arguments into the pydantic model itself."""
    reply = oai.chat.completions.parse(
        model=MODEL_NAME, messages=MESSAGES, tools=[openai.pydantic_function_tool(Forecast)],
        tool_choice="required", max_tokens=300, temperature=1.0, seed=3)
    calls = reply.choices[0].message.tool_calls
    assert calls and all(isinstance(c.function.parsed_arguments, Forecast) for c in calls)


HERMES = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2, '
          '"unit": "celsius", "alerts": false}}\n</tool_call>')


def _regex(text: str) -> str:
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}" else c for c in text)


def test_auto_parses_hermes_output(oai) -> None:
    """The output is forced (by a regex) into Hermes' format: ``auto`` parses it, plain and
    streamed, into the same call."""
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, tool_choice="auto",
                  max_tokens=200, temperature=0.0, extra_body={"regex": _regex(HERMES)})
    plain = oai.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.content is None
    [call] = plain.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Lima", "days": 2, "unit": "celsius",
                                                   "alerts": False}
    final = _stream_final(oai, **kwargs)
    assert final.finish_reason == "tool_calls"
    assert final.message.tool_calls[0].function.arguments == call.function.arguments


def test_auto_without_a_call_is_content(oai) -> None:
    reply = oai.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=8, temperature=0.0,
        extra_body={"regex": "Hello there"})
    choice = reply.choices[0]
    assert choice.message.content == "Hello there" and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


BAD = [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, None),
    ({"tools": [{"type": "retrieval"}]}, None),
    ({"tools": TOOLS + TOOLS[:1]}, "tools.2.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 5}}}}}],
      "tool_choice": "required"}, None),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     None),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_tool_requests_are_400(tool_server, extra, param) -> None:
    r = httpx.post(tool_server.url + "/v1/chat/completions", timeout=60.0, trust_env=False,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"]
    if param is not None:
        assert err["param"] == param, err


def test_tool_result_round_trip(oai) -> None:
    """The assistant's tool call and the tool's result go back as history (the client's own
    message objects); the next turn is served."""
    first = oai.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, **SAMPLING)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*MESSAGES, message, {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    reply = oai.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, **SAMPLING)
    _check_calls(reply.choices[0].message)
