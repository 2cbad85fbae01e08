"""Incremental detokenization and stop strings, against the tokenizer's own full decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from heteroserve.core.models.tiny import build_tokenizer
from heteroserve.core.tokenizer import (
    IncrementalDetokenizer, StopStringMatcher, TokenizerError, load_tokenizer,
)

TEXT = "Hello 😀 wörld, 世界 and café — ok! 🎉🎉 end"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return load_tokenizer(path)


def _stream(tok, ids, stop=(), chunks=None, prompt=()):
    detok = IncrementalDetokenizer(tok, prompt_ids=list(prompt), stop=stop)
    pieces, cumulative = [], []
    i = 0
    sizes = chunks or [1] * len(ids)
    for size in sizes:
        if i >= len(ids):
            break
        pieces.append(detok.add(ids[i:i + size]))
        cumulative.append(detok.text)
        i += size
    pieces.append(detok.finish())
    return detok, pieces, cumulative


def test_multibyte_characters_split_across_tokens_are_never_emitted_partially(tok) -> None:
    ids = tok.encode(TEXT)
    single = [tok.decode([t]) for t in ids]
    assert any("\ufffd" in s for s in single), "test text must split characters across tokens"
    detok, pieces, _ = _stream(tok, ids, prompt=tok.encode("Say:"))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == detok.text == tok.decode(ids) == TEXT


def test_random_chunking_gives_the_same_text(tok) -> None:
    ids = tok.encode(TEXT)
    rng = random.Random(0)
    for _ in range(10):
        chunks = [rng.randint(1, 4) for _ in ids]
        detok, pieces, _ = _stream(tok, ids, chunks=chunks)
        assert "".join(pieces) == TEXT
        assert all("\ufffd" not in p for p in pieces)


def test_stop_string_spanning_tokens_never_leaks(tok) -> None:
    ids = tok.encode(TEXT)
    stop = "世界 and"
    stop_ids = tok.encode(stop)
    assert len(stop_ids) > 1
    detok, pieces, cumulative = _stream(tok, ids, stop=[stop])
    assert detok.stop_matched == stop
    assert detok.text == TEXT[:TEXT.index(stop)]
    assert "".join(pieces) == detok.text
    # at no point did the released text contain the beginning of the stop string
    assert all("世" not in c for c in cumulative)


def test_pending_stop_prefix_is_released_when_the_stream_ends(tok) -> None:
    text = "count to ten 世"
    detok, pieces, cumulative = _stream(tok, tok.encode(text), stop=["世界"])
    assert detok.stop_matched is None
    assert all(not c.endswith("世") for c in cumulative)  # held back while it could match
    assert "".join(pieces) == detok.text == text


def test_special_tokens_are_skipped(tok) -> None:
    ids = tok.encode("hi") + [tok.hf.eos_token_id]
    detok, pieces, _ = _stream(tok, ids)
    assert detok.text == "hi"
    assert detok.output_ids == ids


def test_chat_template_and_missing_template(tok) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "hi" in text
    saved = tok.hf.chat_template
    tok.hf.chat_template = None
    try:
        with pytest.raises(TokenizerError, match="no chat template"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        tok.hf.chat_template = saved


def test_load_tokenizer_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist") as info:
        load_tokenizer(tmp_path / "missing")
    assert "\n" not in str(info.value)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)  # an empty folder: no tokenizer files
    assert "\n" not in str(info.value)


def _reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Cut before the stop string that completes first (ties: the longest)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return text[:end - len(s)], s
    return text, None


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc", max_size=30),
       stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_stop_matcher_is_independent_of_chunking(text: str, stops: list[str],
                                                 cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    m = StopStringMatcher(stops)
    released = []
    for a, b in zip(bounds, bounds[1:]):
        released.append(m.feed(text[a:b]))
        assert not any(s in "".join(released) for s in stops)
    released.append(m.flush())
    expected, matched = _reference_cut(text, stops)
    assert "".join(released) == expected
    assert m.matched == matched


def test_unchecked_text_passes_the_stop_strings_and_matching_resumes_after() -> None:
    """``feed(check=False)`` (``min_new_tokens`` not reached): what is held and the new text
    are released as they are, a stop string in them included; the next checked piece is
    matched again."""
    m = StopStringMatcher(["STOP"])
    assert m.feed("a ST") == "a "  # held: could start the stop string
    assert m.feed("OP b", check=False) == "STOP b"
    assert m.matched is None
    assert m.feed("c STOP d") == "c "
    assert m.matched == "STOP"
