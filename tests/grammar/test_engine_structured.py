"""Structured outputs through the whole engine with a random-weight model: unconstrained it
emits garbage, so every output that parses is the grammar's doing."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import heteroserve
from grammar_schemas import SCHEMAS
from heteroserve.core.models.tiny import build_tiny_model
from heteroserve.core.runtime.errors import RequestError


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("llama"), "llama", seed=10)
    eng = heteroserve.Engine(model_path=str(path), platform="cpu", dtype="float32",
                             max_total_tokens=16384)
    yield eng
    eng.shutdown()


def test_every_json_schema_output_validates(engine) -> None:
    names = sorted(SCHEMAS)
    outs = engine.generate(["Answer in JSON:"] * len(names), [
        {"json_schema": json.dumps(SCHEMAS[n]), "max_new_tokens": 200, "temperature": 1.0,
         "seed": i} for i, n in enumerate(names)])
    assert len(names) >= 20
    for name, out in zip(names, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", name
        # random weights can emit byte sequences that are not UTF-8: the grammar counts such a
        # run as one character, the decoded text as one U+FFFD per byte
        text = re.sub("\ufffd+", "\ufffd", out["text"])
        jsonschema.validate(json.loads(text), SCHEMAS[name],
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_regex_choice_and_ebnf(engine) -> None:
    pattern = r"[A-Z][a-z]{2,5} (has|owns) [0-9]{1,3} (cats|dogs)"
    choices = ["red", "green", "blue sky"]
    ebnf = 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c]+'
    for seed in range(3):
        sp = {"max_new_tokens": 64, "temperature": 1.0, "seed": seed}
        assert re.fullmatch(pattern, engine.generate("x", {**sp, "regex": pattern})["text"])
        assert engine.generate("x", {**sp, "choice": choices})["text"] in choices
        assert re.fullmatch(r"\[[a-c]+(,[a-c]+)*\]", engine.generate("x", {**sp, "ebnf": ebnf})["text"])


def test_mixed_batch_each_gets_what_it_asked(engine) -> None:
    plain = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    alone = engine.generate("The weather today", plain)["output_ids"]
    outs = engine.generate(["The weather today", "Name:", "The weather today"], [
        plain, {"regex": "[0-9]{4}", "max_new_tokens": 12}, plain])
    assert outs[0]["output_ids"] == alone == outs[2]["output_ids"]
    assert re.fullmatch("[0-9]{4}", outs[1]["text"])


@pytest.mark.parametrize("params, needle", [
    ({"regex": "a(b"}, "parenthesis"),
    ({"json_schema": '{"type": 5}'}, "Type should be a string"),
    ({"ebnf": "root ::= undefined_rule"}, "not defined"),
])
def test_invalid_grammar_is_a_request_error(engine, params, needle) -> None:
    with pytest.raises(RequestError, match=needle):
        engine.generate("x", params)
    # the engine still serves (ignore_eos: a sampled end-of-sequence token would end it early)
    after = engine.generate("x", {"max_new_tokens": 2, "ignore_eos": True})
    assert after["meta_info"]["completion_tokens"] == 2


def test_grammar_waits_for_the_reasoning_section_to_close(tmp_path) -> None:
    path = build_tiny_model(tmp_path / "r1", "llama", seed=11)
    eng = heteroserve.Engine(model_path=str(path), platform="cpu", dtype="float32",
                             max_total_tokens=8192, reasoning_parser="deepseek-r1")
    try:
        think_end = eng.tokenizer.hf.convert_tokens_to_ids("</think>")
        schema = SCHEMAS["flat_object"]
        out = eng.generate("q", {"json_schema": json.dumps(schema), "max_new_tokens": 120,
                                 "temperature": 1.0, "seed": 3,
                                 "logit_bias": {str(think_end): 100.0},
                                 "skip_special_tokens": False})
        # </think> is illegal JSON: the grammar could only have allowed it because it was off
        assert out["output_ids"][0] == think_end
        reasoning, _, content = out["text"].partition("</think>")
        jsonschema.validate(json.loads(content), schema)
    finally:
        eng.shutdown()


def test_bench_with_a_schema_writes_the_comparison(tmp_path) -> None:
    import subprocess
    import sys

    path = build_tiny_model(tmp_path / "b", "llama", seed=12)
    out = tmp_path / "structured.json"
    schema = json.dumps(SCHEMAS["flat_object"])
    proc = subprocess.run(
        [sys.executable, "-m", "heteroserve.server.cli", "bench", "--model-path", str(path),
         "--platform", "cpu", "--dtype", "float32", "--max-total-tokens", "8192",
         "--input-len", "8", "--output-len", "16", "--disable-tqdm", "--json-schema", schema,
         "--output-json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    for batch in ("batch_1", "batch_64"):
        assert data[batch]["constrained"]["failed"] == 0
        assert data[batch]["decode_speed_ratio"] > 0
