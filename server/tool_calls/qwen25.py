"""``qwen25``: Qwen2.5 (and QwQ, Qwen3's non-coder models) use Hermes' wire format, with
the JSON on its own line inside the block::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

It is its own name because SGLang users pass ``--tool-call-parser qwen25``.
"""

from __future__ import annotations

from heteroserve.server.tool_calls.hermes import HermesParser


class Qwen25Parser(HermesParser):
    name = "qwen25"
