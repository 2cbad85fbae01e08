"""``llama3_json``: Llama 3.1 / 3.2 / 3.3 with JSON-based tool calling answer with a bare
JSON object (after the ``<|python_tag|>`` token when it is kept), several separated by
``;``::

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}

An output is a call only when it starts with ``{`` or contains ``<|python_tag|>``; text
before the tag and after the last object is content.
"""

from __future__ import annotations

from heteroserve.server.tool_calls.base import (
    CallDraft, Scan, ToolCallParser, call_from_object, join_content, open_text,
)
from heteroserve.server.tool_calls.jsonscan import skip_ws

TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    name = "llama3_json"

    def scan(self, text: str, final: bool) -> Scan:
        tag = text.find(TAG)
        lead = skip_ws(text, 0)
        if tag >= 0 and not text.startswith("{", lead):
            head, pos = text[:tag].rstrip(), skip_ws(text, tag + len(TAG))
        elif text.startswith("{", lead):
            head, pos = "", lead
        else:
            return Scan(open_text(text, (TAG,), final))
        calls: list[CallDraft] = []
        tail = ""
        while pos < len(text):
            if text[pos] != "{":
                if calls:
                    tail = text[pos:]
                else:
                    calls.append(CallDraft(error=True))
                break
            draft, end = call_from_object(text, pos)
            calls.append(draft)
            if end is None or draft.error:
                break
            after = skip_ws(text, end)
            if after < len(text) and text[after] == ";":
                pos = skip_ws(text, after + 1)
            else:
                tail = text[after:]
                break
        if final and not calls:
            calls.append(CallDraft(error=True))  # a tag with nothing after it
        return Scan(join_content([head, tail]), calls)
