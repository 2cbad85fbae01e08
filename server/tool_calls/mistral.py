"""``mistral``: Mistral models start their calls with the ``[TOOL_CALLS]`` token, then
either a JSON array of call objects (Mistral 7B v0.3, Mixtral, Nemo)::

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

or, from tokenizer v11 on (Mistral Small 3.2, Magistral, Devstral), each call as the name,
``[ARGS]`` and its arguments object, one ``[TOOL_CALLS]`` per call::

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

Text before the first ``[TOOL_CALLS]`` and after the calls is content. ``[TOOL_CALLS]`` is
a special token, so the output must be detokenized with special tokens kept.
"""

from __future__ import annotations

from heteroserve.server.tool_calls.base import (
    CallDraft, Scan, ToolCallParser, call_array, join_content, open_text,
)
from heteroserve.server.tool_calls.jsonscan import scan_object, skip_ws

MARKER, ARGS = "[TOOL_CALLS]", "[ARGS]"


def _compact(text: str, start: int, final: bool) -> tuple[CallDraft, int | None]:
    """``name[ARGS]{...}`` at ``text[start]``: the call and the index past it."""
    sep = text.find(ARGS, start)
    if sep < 0:
        return CallDraft(error=final), None
    draft = CallDraft(name=text[start:sep].strip() or None)
    i = skip_ws(text, sep + len(ARGS))
    if draft.name is None or (i < len(text) and text[i] != "{"):
        draft.error = True
        return draft, None
    if i >= len(text):
        draft.error = final
        return draft, None
    obj = scan_object(text, i)
    draft.error, draft.complete = obj.error, obj.end is not None
    draft.arguments = text[i:obj.end] if obj.end is not None else text[i:]
    return draft, obj.end


class MistralParser(ToolCallParser):
    name = "mistral"
    needs_special_tokens = True

    def scan(self, text: str, final: bool) -> Scan:
        first = text.find(MARKER)
        if first < 0:
            return Scan(open_text(text, (MARKER,), final))
        parts = [text[:first].rstrip()]
        calls: list[CallDraft] = []
        pos: int | None = first
        while pos is not None and text.startswith(MARKER, pos):
            i = skip_ws(text, pos + len(MARKER))
            if i >= len(text):
                if final:
                    calls.append(CallDraft(error=True))
                pos = None
            elif text[i] == "[":
                more, pos, error = call_array(text, i)
                calls += more
                if error:
                    calls.append(CallDraft(error=True))
                    pos = None
            else:
                draft, pos = _compact(text, i, final)
                calls.append(draft)
                if draft.error:
                    pos = None
            if pos is not None:
                pos = skip_ws(text, pos)
                if not final and MARKER.startswith(text[pos:]):
                    pos = None  # the rest may be the next [TOOL_CALLS]
        if pos is not None:
            parts.append(open_text(text[pos:], (MARKER,), final))
        return Scan(join_content(parts), calls)
