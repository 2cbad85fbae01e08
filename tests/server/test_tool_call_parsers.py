"""``--tool-call-parser`` parsers on known model outputs (formats as each model family writes
them), whole and streamed in random chunks: the streamed deltas must add up to the whole
parse. Also the forced (``required`` / named) parsers, the JSON scanner on every prefix, and
the ``required`` schema."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heteroserve.server.protocol import ChatTool
from heteroserve.server.tool_calls import PARSERS, create_parser
from heteroserve.server.tool_calls.base import ParsedCall, ParsedOutput, ToolCallParser
from heteroserve.server.tool_calls.forced import NamedParser, RequiredParser
from heteroserve.server.tool_calls.jsonscan import scan_object
from heteroserve.server.tool_calls.plan import required_schema
from heteroserve.server.tool_calls.stream import ToolCallStream

W = '{"city": "Paris", "days": [1, {"a": "}]\\""}], "x": null}'
W2 = '{"city": "東京"}'
DS_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{args}\n```<｜tool▁call▁end｜>"

#: (parser, model output, expected content, expected calls)
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>',
     None, [("get_weather", W)]),
    ("hermes", f'Let me look.\n<tool_call>\n{{"name": "a", "arguments": {W}}}\n</tool_call>\n'
               f'<tool_call>\n{{"arguments": {W2}, "name": "b"}}\n</tool_call>',
     "Let me look.", [("a", W), ("b", W2)]),
    ("hermes", "No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and "
     "<tool is not a tag.", []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"q\\": 1}"}</tool_call>', None,
     [("f", '{"q": 1}')]),
    ("qwen25", f'<tool_call>\n{{"name": "get_weather", "arguments": {W}}}\n</tool_call>',
     None, [("get_weather", W)]),
    ("llama3_json", f'<|python_tag|>{{"name": "get_weather", "parameters": {W}}}', None,
     [("get_weather", W)]),
    ("llama3_json", f'{{"name": "a", "parameters": {W}}}; {{"name": "b", "arguments": {W2}}}',
     None, [("a", W), ("b", W2)]),
    ("llama3_json", "The answer is {42}.", "The answer is {42}.", []),
    ("mistral", f'[TOOL_CALLS] [{{"name": "a", "arguments": {W}}}, {{"name": "b", '
                f'"arguments": {W2}}}]', None, [("a", W), ("b", W2)]),
    ("mistral", f'Sure.[TOOL_CALLS]a[ARGS]{W}[TOOL_CALLS]b[ARGS]{W2}', "Sure.",
     [("a", W), ("b", W2)]),
    ("mistral", "[TOOL_CALLS is not here]", "[TOOL_CALLS is not here]", []),
    ("deepseek_v3", "I will check.<｜tool▁calls▁begin｜>" + DS_CALL.format(name="a", args=W)
     + "\n" + DS_CALL.format(name="b", args=W2) + "<｜tool▁calls▁end｜>", "I will check.",
     [("a", W), ("b", W2)]),
]


def streamed(parser: ToolCallParser, text: str, seed: int) -> ParsedOutput:
    """``text`` pushed through a :class:`ToolCallStream` in random pieces, the deltas
    accumulated as the OpenAI client does."""
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        pieces.append(text[i:i + n])
        i += n
    stream = ToolCallStream(parser)
    content, calls, ids = "", {}, set()
    for k, piece in enumerate(pieces + [""]):
        step = stream.push(piece, final=k == len(pieces))
        content += step.content
        for delta in step.tool_calls:
            call = calls.setdefault(delta.index, {"name": None, "arguments": ""})
            if delta.id is not None:
                assert delta.index not in ids and delta.id.startswith("call_")
                ids.add(delta.index)
                call["name"] = delta.function.name
            call["arguments"] += delta.function.arguments or ""
    assert ids == set(calls), "every call's first delta carries its id"
    return ParsedOutput(content or None, tuple(ParsedCall(c["name"], c["arguments"])
                                              for _, c in sorted(calls.items())))


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_parser_whole_and_streamed(name, text, content, calls) -> None:
    parser = create_parser(name)
    expected = ParsedOutput(content, tuple(ParsedCall(n, a) for n, a in calls))
    assert parser.parse(text) == expected
    for seed in range(5):
        assert streamed(parser, text, seed) == expected


@pytest.mark.parametrize("name,text", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1'),  # cut off
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # no name
    ("hermes", "<tool_call>\nnot json\n</tool_call>"),
    ("llama3_json", '{"name": "f", "parameters": {"a": tru}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {}}, oops]'),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n"),
])
def test_malformed_calls_are_content(name, text) -> None:
    assert create_parser(name).parse(text) == ParsedOutput(text, ())


def test_partial_marker_is_held_back_while_streaming() -> None:
    stream = ToolCallStream(create_parser("hermes"))
    assert stream.push("Hi <tool_").content == "Hi"
    step = stream.push('call>{"name": "f", "arguments": {"a"')
    assert step.content == "" and step.tool_calls[0].function.name == "f"
    assert step.tool_calls[0].function.arguments == '{"a"'
    stream = ToolCallStream(create_parser("hermes"))
    assert stream.push("Hi <tool_").content == "Hi"
    assert stream.push("", final=True).content == " <tool_"


def test_registry() -> None:
    assert {"hermes", "llama3_json", "mistral", "qwen25", "deepseek_v3"} <= set(PARSERS)
    assert all(cls.name == name for name, cls in PARSERS.items())
    with pytest.raises(ValueError, match="--tool-call-parser must be one of"):
        create_parser("gpt5")


def test_forced_parsers_whole_and_streamed() -> None:
    text = f'[{{"name": "a", "parameters": {W}}},{{"name": "b", "parameters": {W2}}}]'
    expected = ParsedOutput(None, (ParsedCall("a", W), ParsedCall("b", W2)))
    assert RequiredParser().parse(text) == expected
    assert streamed(RequiredParser(), text, 0) == expected
    named = NamedParser("get_weather")
    assert named.parse(W) == ParsedOutput(None, (ParsedCall("get_weather", W),))
    assert streamed(named, W, 1) == named.parse(W)
    assert named.parse(W[:-3]) == ParsedOutput(W[:-3], ())  # cut off by max_tokens
    assert RequiredParser().parse("[]") == ParsedOutput("[]", ())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=4), json_values, min_size=1, max_size=4),
       st.sampled_from([None, 0, 2]))
def test_scan_object_on_every_prefix(obj, indent) -> None:
    """Each member's raw value text on any prefix is a prefix of its final text, and the
    complete scan finds exactly the members json.loads sees."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    full = scan_object(text, 0)
    assert full.end == len(text) and not full.error
    assert {m.key: json.loads(m.raw(text)) for m in full.members} == obj
    finals = {m.key: m.raw(text) for m in full.members}
    for cut in range(len(text)):
        part = scan_object(text[:cut], 0)
        assert not part.error and part.end is None
        for m in part.members:
            assert finals[m.key].startswith(m.raw(text[:cut]))


def test_required_schema_hoists_defs() -> None:
    """Tools whose schemas use ``$defs`` (pydantic's output) still validate when nested."""
    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [ChatTool.model_validate({"type": "function", "function": {
        "name": "forecast", "parameters": {"$defs": {"Place": place}, "type": "object",
                                           "properties": {"place": {"$ref": "#/$defs/Place"}},
                                           "required": ["place"]}}}),
             ChatTool.model_validate({"type": "function", "function": {"name": "noop"}})]
    schema = required_schema(tools, parallel=False)
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [{"name": "forecast", "parameters": {"place": {"city": "Lima"}}}]
    jsonschema.validate(good, schema)
    jsonschema.validate([{"name": "noop", "parameters": {}}], schema)
    for bad in ([], good * 2, [{"name": "forecast", "parameters": {"place": {}}}],
                [{"name": "other", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parallel_false_keeps_the_first_call_while_streaming() -> None:
    text = f'[TOOL_CALLS] [{{"name": "a", "arguments": {W}}}, {{"name": "b", "arguments": {W2}}}]'
    stream = ToolCallStream(create_parser("mistral"), max_calls=1)
    deltas = stream.push(text, final=True).tool_calls
    assert {d.index for d in deltas} == {0} and deltas[0].function.arguments == W


def test_unknown_parser_fails_at_start_up(tmp_path) -> None:
    """A bad --tool-call-parser stops ``serve`` with one line, before any model loads."""
    proc = subprocess.run([sys.executable, "-m", "heteroserve.server.cli", "serve",
                           "--model-path", str(tmp_path / "absent"), "--port", "0",
                           "--tool-call-parser", "gpt5"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "--tool-call-parser must be one of" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_history_tool_call_arguments_reach_the_template_as_objects() -> None:
    """An assistant turn's ``arguments`` JSON text is decoded for the chat template."""
    from heteroserve.server.chat import template_message
    from heteroserve.server.protocol import ChatMessage

    msg = ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": W}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "oops"}}]})
    out = template_message(0, msg)
    assert out["tool_calls"][0]["function"]["arguments"] == json.loads(W)
    assert out["tool_calls"][1]["function"]["arguments"] == "oops"
    assert out["content"] == ""
