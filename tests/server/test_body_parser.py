"""server/body_parser.py: the helper process parses large bodies and refuses a string no
request field may hold, so neither the parse nor the refused megabytes hold the server's GIL."""

from __future__ import annotations

import asyncio
import json

import pytest

from heteroserve.server.body_parser import (
    BodyParser, FieldTooLong, LongString, ParseFailure, first_long_string, parse_and_check,
)


def test_the_first_long_string_is_named_by_its_path() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "ok"},
                                       {"role": "user", "content": "x" * 11}],
            "stop": ["y" * 11]}
    assert first_long_string(body, 10) == LongString("messages[1].content", 11)
    assert first_long_string(body, 11) is None
    assert first_long_string("z" * 5, 4) == LongString("body", 5)
    assert first_long_string({"k" * 5: 1}, 4) == LongString("<key>", 5)
    deep: list = []
    node = deep
    for _ in range(5000):  # deeper than Python's recursion limit: the walk is iterative
        node.append([])
        node = node[0]
    node.append("w" * 9)
    assert first_long_string(deep, 8).chars == 9


def test_parse_and_check_returns_failures_instead_of_raising() -> None:
    assert parse_and_check(b'{"a": [1, "bb"]}', 5) == {"a": [1, "bb"]}
    assert parse_and_check(b'{"prompt": "' + b"y" * 64 + b'"}', 10) == LongString("prompt", 64)
    bad = parse_and_check(b'{"a": ', 10)
    assert isinstance(bad, ParseFailure) and bad.pos == 6
    assert parse_and_check(b'"\xff\xfe\xfa"', 10).pos == -1  # not UTF-8
    assert parse_and_check(b"[" * 200000 + b"]" * 200000, 10).pos == -1  # nested too deep


def test_the_helper_process_parses_refuses_and_reports_bad_json() -> None:
    parser = BodyParser(max_chars=1000, context_len=16)

    async def run() -> None:
        ids = list(range(600_000))  # about 4.6 MB of JSON
        assert await parser.parse(json.dumps({"prompt": ids}).encode()) == {"prompt": ids}
        with pytest.raises(FieldTooLong) as err:
            await parser.parse(json.dumps({"messages": [{"content": "q" * 5000}]}).encode())
        assert err.value.status_code == 400 and err.value.param == "messages[0].content"
        assert "5000 characters" in err.value.detail and "16 tokens" in err.value.detail
        with pytest.raises(json.JSONDecodeError) as bad:
            await parser.parse(b'{"prompt": [1, 2,')
        assert bad.value.pos == 17
        with pytest.raises(ValueError, match="recursion|deep"):
            await parser.parse(b"[" * 200000 + b"]" * 200000)

    try:
        asyncio.run(run())
    finally:
        parser.close()
    parser.close()  # twice is fine
