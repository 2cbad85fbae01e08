"""``hermes``: NousResearch Hermes 2 Pro / 3 (and many fine-tunes) write each call as one
JSON object between ``<tool_call>`` and ``</tool_call>``::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several blocks may follow one another; text outside the blocks is content.
"""

from __future__ import annotations

from heteroserve.server.tool_calls.base import (
    CallDraft, Scan, ToolCallParser, call_from_object, scan_blocks,
)

START, END = "<tool_call>", "</tool_call>"


def object_body(inner: str, final: bool) -> list[CallDraft]:
    """The one call of a block whose inner text is a JSON call object."""
    body = inner.lstrip()
    if not body:
        return [CallDraft(error=True)] if final else []
    if body[0] != "{":
        return [CallDraft(error=True)]
    draft, _ = call_from_object(body, 0)
    return [draft]


class HermesParser(ToolCallParser):
    name = "hermes"

    def scan(self, text: str, final: bool) -> Scan:
        return scan_blocks(text, START, END, object_body, final)
