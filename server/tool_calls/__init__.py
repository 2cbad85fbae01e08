"""Tool calling for the chat route: ``--tool-call-parser`` parsers (one module per model
family), the ``tool_choice`` plan (:mod:`.plan`), and streaming deltas (:mod:`.stream`).

:data:`PARSERS` maps each ``--tool-call-parser`` name to its parser class;
:func:`create_parser` builds one (``ValueError`` for an unknown name).
"""

from __future__ import annotations

from heteroserve.server.tool_calls.base import ToolCallParser
from heteroserve.server.tool_calls.deepseek_v3 import DeepSeekV3Parser
from heteroserve.server.tool_calls.hermes import HermesParser
from heteroserve.server.tool_calls.llama3_json import Llama3JsonParser
from heteroserve.server.tool_calls.mistral import MistralParser
from heteroserve.server.tool_calls.qwen25 import Qwen25Parser

PARSERS: dict[str, type[ToolCallParser]] = {cls.name: cls for cls in (
    HermesParser, Qwen25Parser, Llama3JsonParser, MistralParser, DeepSeekV3Parser)}


def create_parser(name: str) -> ToolCallParser:
    """The parser called ``name``. Raises ``ValueError`` (one line) for an unknown name."""
    cls = PARSERS.get(name)
    if cls is None:
        raise ValueError(f"--tool-call-parser must be one of {', '.join(sorted(PARSERS))}, "
                         f"got {name!r}")
    return cls()
