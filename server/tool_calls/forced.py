"""Parsers for outputs constrained by ``tool_choice`` (no ``--tool-call-parser`` needed).

``required``: the grammar makes the output a JSON array of ``{"name", "parameters"}``
objects (at least one); ``{"type": "function", "function": {"name": F}}``: the output is F's
arguments object itself. Both read the output as it streams, like the model-format parsers.
"""

from __future__ import annotations

from heteroserve.server.tool_calls.base import CallDraft, Scan, ToolCallParser, call_array
from heteroserve.server.tool_calls.jsonscan import scan_object, skip_ws


class RequiredParser(ToolCallParser):
    """The output is ``[{"name": ..., "parameters": {...}}, ...]``."""

    name = "required"

    def scan(self, text: str, final: bool) -> Scan:
        i = skip_ws(text, 0)
        if i >= len(text):
            return Scan(calls=[CallDraft(error=True)] if final else [])
        if text[i] != "[":
            return Scan(calls=[CallDraft(error=True)])
        calls, end, error = call_array(text, i)
        if error or (final and (end is None or not calls)):
            calls.append(CallDraft(error=True))
        return Scan(calls=calls)


class NamedParser(ToolCallParser):
    """The output is the arguments object of function ``function``."""

    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def scan(self, text: str, final: bool) -> Scan:
        i = skip_ws(text, 0)
        if i >= len(text):
            return Scan(calls=[CallDraft(self.function, error=final)])
        obj = scan_object(text, i)
        end = obj.end if obj.end is not None else len(text)
        return Scan(calls=[CallDraft(self.function, text[i:end], complete=obj.end is not None,
                                     error=obj.error)])
