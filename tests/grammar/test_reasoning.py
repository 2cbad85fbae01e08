"""Reasoning-section parsing for deepseek-r1 and qwen3 outputs."""

from __future__ import annotations

import pytest

from heteroserve.core.grammar.reasoning import ReasoningParser
from heteroserve.core.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_create_finds_think_end_token(tokenizer) -> None:
    parser = ReasoningParser.create("deepseek-r1", tokenizer)
    assert tokenizer.convert_ids_to_tokens(parser.think_end_id) == "</think>"
    assert not parser.reasoning_closed([5, 6])
    assert parser.reasoning_closed([5, parser.think_end_id, 7])
    with pytest.raises(ValueError, match="must be one of"):
        ReasoningParser.create("nope", tokenizer)


@pytest.mark.parametrize("kind, text, expected", [
    ("deepseek-r1", "let me think\n</think>\n{\"a\": 1}", ("let me think", '{"a": 1}')),
    ("deepseek-r1", "still thinking", ("still thinking", "")),
    ("deepseek-r1", "<think>x</think>y", ("x", "y")),
    ("qwen3", "<think>\nhmm\n</think>\n\nanswer", ("hmm", "answer")),
    ("qwen3", "plain answer", (None, "plain answer")),
    ("qwen3", "<think>open", ("open", "")),
])
def test_split(tokenizer, kind, text, expected) -> None:
    assert ReasoningParser.create(kind, tokenizer).split(text) == expected
