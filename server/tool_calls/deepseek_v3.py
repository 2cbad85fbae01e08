"""``deepseek_v3``: DeepSeek-V3 (and R1) wrap all calls in one section of special-looking
tokens; each call names its type and function, then gives the arguments as a fenced JSON
block::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The markers are tokens of the model's vocabulary, so they must be detokenized.
"""

from __future__ import annotations

from heteroserve.server.tool_calls.base import CallDraft, Scan, ToolCallParser, scan_blocks
from heteroserve.server.tool_calls.jsonscan import scan_object, skip_ws

SECTION_START, SECTION_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_START, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE = "```json"


def _one_call(text: str, final: bool) -> CallDraft:
    """The call whose text (after ``<｜tool▁call▁begin｜>``) is ``text``."""
    sep = text.find(SEP)
    if sep < 0:
        return CallDraft(error=final)
    newline = text.find("\n", sep)
    if newline < 0:
        return CallDraft(error=final)
    name = text[sep + len(SEP):newline].strip()
    if not name:
        return CallDraft(error=True)
    draft = CallDraft(name=name)
    i = skip_ws(text, newline)
    if text.startswith(FENCE, i):
        i = skip_ws(text, i + len(FENCE))
    elif FENCE.startswith(text[i:]) and not final:
        return draft
    if i >= len(text):
        draft.error = final
        return draft
    if text[i] != "{":
        draft.error = True
        return draft
    obj = scan_object(text, i)
    draft.error = obj.error
    draft.arguments = text[i:obj.end] if obj.end is not None else text[i:]
    draft.complete = obj.end is not None
    return draft


def section_body(inner: str, final: bool) -> list[CallDraft]:
    """The calls of a tool-calls section's inner text."""
    calls = []
    pos = inner.find(CALL_START)
    while pos >= 0:
        start = pos + len(CALL_START)
        end = inner.find(CALL_END, start)
        calls.append(_one_call(inner[start:] if end < 0 else inner[start:end],
                               final or end >= 0))
        if end < 0:
            break
        pos = inner.find(CALL_START, end)
    return calls


class DeepSeekV3Parser(ToolCallParser):
    name = "deepseek_v3"
    needs_special_tokens = True

    def scan(self, text: str, final: bool) -> Scan:
        return scan_blocks(text, SECTION_START, SECTION_END, section_body, final)
