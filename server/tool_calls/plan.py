"""``tools`` + ``tool_choice`` of a chat request -> a :class:`ToolPlan`: what reaches the
chat template, which output constraint the grammar engine enforces, and which parser reads
the output. Everything a request can get wrong about tools is a 400 raised here, once.

=============  ==============================================================================
tool_choice    behaviour
=============  ==============================================================================
``none``       tools are rendered into the prompt (as vLLM does), the output is not parsed
``auto``       the output is parsed with ``--tool-call-parser`` (400 without one); the
               default when tools are given and the server has a parser, else ``none``;
               only the first call is kept when ``parallel_tool_calls`` is false
``required``   the grammar forces a JSON array of ``{"name", "parameters"}`` objects, each
               valid against its tool's schema (one item when ``parallel_tool_calls`` is false)
named          the grammar forces the named function's arguments object
=============  ==============================================================================
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from heteroserve.server.errors import bad_request
from heteroserve.server.protocol import ChatCompletionRequest, ChatTool, NamedToolChoice
from heteroserve.server.tool_calls.base import ToolCallParser
from heteroserve.server.tool_calls.forced import NamedParser, RequiredParser

#: the most tools one request may declare
MAX_TOOLS = 128
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_DEFS = ("$defs", "definitions")


class ToolMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    NAMED = "named"


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses tools. ``parser`` reads its output (None: plain content);
    ``constraint``: sampling-parameter entries that force the output (``json_schema``);
    ``template_tools``: the tools as the chat template receives them (None: no tools);
    ``max_calls``: calls kept from one output (1 with ``parallel_tool_calls: false``)."""

    mode: ToolMode
    parser: ToolCallParser | None = None
    constraint: dict[str, str] | None = None
    template_tools: list[dict[str, Any]] | None = None
    max_calls: int | None = None


def _parameters(tool: ChatTool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else _NO_PARAMETERS


def _check_tools(tools: list[ChatTool], max_bytes: int) -> None:
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools may be given, got {len(tools)}", "tools")
    names: set[str] = set()
    size = 0
    for i, tool in enumerate(tools):
        fn = tool.function
        if fn.name in names:
            raise bad_request(f"tool name {fn.name!r} is given twice", f"tools.{i}.function.name")
        names.add(fn.name)
        params = fn.parameters
        if params is not None and params.get("type", "object") != "object":
            raise bad_request("function parameters must be a JSON schema of type 'object'",
                              f"tools.{i}.function.parameters")
        size += len(json.dumps(params or {}))
    if size > max_bytes:
        raise bad_request(f"the tools' parameter schemas take {size} bytes, more than the "
                          f"server's limit of {max_bytes} (--grammar-max-bytes)", "tools")


def _hoist_defs(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without its ``$defs``/``definitions``, which move into ``defs`` (so that
    ``#/$defs/X`` references still resolve when the schema is nested in a bigger one)."""
    out = dict(schema)
    for key in _DEFS:
        for name, sub in (out.pop(key, None) or {}).items():
            if defs.setdefault(name, sub) != sub:
                raise bad_request(f"two tools define {key} entry {name!r} differently; "
                                  "rename one", "tools")
    return out


def required_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """The JSON schema of an output that calls one or more of ``tools``."""
    defs: dict[str, Any] = {}
    options = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]},
                       "parameters": _hoist_defs(_parameters(t), defs)},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    } for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    uses_definitions = any("#/definitions/" in json.dumps(_parameters(t)) for t in tools)
    if uses_definitions:
        schema["definitions"] = defs
    return schema


def plan_tools(req: ChatCompletionRequest, parser: ToolCallParser | None,
               max_bytes: int) -> ToolPlan:
    """The :class:`ToolPlan` of ``req`` given the server's ``--tool-call-parser`` (None: no
    parser). Raises a 400 APIError for too many or too large tools, duplicate names, a
    parameters schema that is not an object schema, ``required`` or a named function
    without tools, a named function that is not among the tools, or ``auto`` without a
    parser."""
    tools = list(req.tools or [])
    choice = req.tool_choice
    _check_tools(tools, max_bytes)
    template = [t.model_dump(exclude_none=True) for t in tools] or None
    if isinstance(choice, NamedToolChoice):
        by_name = {t.function.name: t for t in tools}
        tool = by_name.get(choice.function.name)
        if tool is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise bad_request(f"tool_choice names function {choice.function.name!r}, which is "
                              f"not among the tools (given: {known})", "tool_choice")
        return ToolPlan(ToolMode.NAMED, NamedParser(tool.function.name),
                        {"json_schema": json.dumps(_parameters(tool))}, template)
    if choice == "required":
        if not tools:
            raise bad_request("tool_choice 'required' needs at least one tool in tools",
                              "tool_choice")
        schema = required_schema(tools, req.parallel_tool_calls is not False)
        return ToolPlan(ToolMode.REQUIRED, RequiredParser(), {"json_schema": json.dumps(schema)},
                        template)
    if choice == "auto" and tools and parser is None:
        raise bad_request("tool_choice 'auto' needs the server started with "
                          "--tool-call-parser NAME", "tool_choice")
    if tools and parser is not None and choice in (None, "auto"):
        return ToolPlan(ToolMode.AUTO, parser, None, template,
                        1 if req.parallel_tool_calls is False else None)
    return ToolPlan(ToolMode.NONE, None, None, template)
